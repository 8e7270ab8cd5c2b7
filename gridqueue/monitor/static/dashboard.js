// gridqueue dashboard: live updates, relative ages, and the operator's actions.
//
// Each page is rendered on the server. This script listens to /api/stream (one event per
// ledger transition), patches the element a transition names at once (data-worker,
// data-job with data-state), then fetches the page's live part again, throttled, and
// swaps it in. Actions are POSTs with the token the operator entered (sessionStorage).
"use strict";

(() => {
  const TOKEN_KEY = "gridqueue.dashboardToken";
  const MIN_REFRESH_MS = 250; // at most four refetches a second, however busy the fleet
  const IDLE_REFRESH_MS = 5000; // heartbeat ages move even when nothing happens
  const body = document.body;
  const readOnly = body.dataset.readOnly === "true";
  const watch = body.dataset.watch || "*";
  let clockOffsetMs = 0; // Redis server time minus this browser's clock

  // -- time ------------------------------------------------------------------------------

  function setServerNow(ms) {
    const value = Number(ms);
    if (value > 0) clockOffsetMs = value - Date.now();
  }

  function serverNow() {
    return Date.now() + clockOffsetMs;
  }

  function duration(ms) {
    ms = Math.max(Number(ms) || 0, 0);
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    if (ms < 3600000) return `${Math.round(ms / 60000)} min`;
    if (ms < 86400000) return `${(ms / 3600000).toFixed(1)} h`;
    return `${(ms / 86400000).toFixed(1)} d`;
  }

  function tickAges() {
    const now = serverNow();
    for (const el of document.querySelectorAll("time[data-ts]")) {
      el.textContent = `${duration(now - Number(el.dataset.ts))} ago`;
    }
    for (const el of document.querySelectorAll("time[data-until]")) {
      const left = Number(el.dataset.until) - now;
      el.textContent = left > 0 ? `in ${duration(left)}` : "now";
    }
  }

  // Attempt bars on a job's timeline, placed between the job's creation and its end.
  function layoutTimelines() {
    for (const timeline of document.querySelectorAll(".timeline[data-start]")) {
      const start = Number(timeline.dataset.start);
      const end = Math.max(Number(timeline.dataset.end) || serverNow(), start + 1);
      for (const span of timeline.querySelectorAll(".span[data-from]")) {
        const from = Number(span.dataset.from) || start;
        const to = Number(span.dataset.to) || end;
        const left = ((from - start) / (end - start)) * 100;
        const width = ((to - from) / (end - start)) * 100;
        span.style.left = `${Math.min(Math.max(left, 0), 100)}%`;
        span.style.width = `${Math.min(Math.max(width, 0.3), 100 - Math.max(left, 0))}%`;
      }
    }
  }

  // -- messages --------------------------------------------------------------------------

  function flash(kind, text) {
    const box = document.getElementById("flash");
    if (!box) return;
    const msg = document.createElement("div");
    msg.className = `msg ${kind}`;
    msg.dataset.kind = kind;
    msg.textContent = text;
    box.prepend(msg);
    setTimeout(() => msg.remove(), kind === "error" ? 12000 : 5000);
  }

  // -- the token -------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function showToken() {
    const state = document.getElementById("token-state");
    if (!state) return;
    state.dataset.set = token() ? "true" : "false";
    state.textContent = token() ? "token set" : "no token";
  }

  function setupToken() {
    const form = document.getElementById("token-form");
    if (!form) return;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = document.getElementById("token-input");
      const value = input.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      input.value = "";
      showToken();
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showToken();
    });
    showToken();
  }

  // -- actions ---------------------------------------------------------------------------

  function describe(reply) {
    if (reply.action) {
      const moved = reply.attempts_moved ? `; ${reply.attempts_moved} running attempt(s) moved` : "";
      return `${reply.action} ${reply.worker}: done${moved}`;
    }
    if (reply.cancelled) return `cancelled ${reply.job}`;
    if (reply.replayed) {
      const failed = reply.failed.length ? `, ${reply.failed.length} failed` : "";
      return `replayed ${reply.replayed.length} of ${reply.matched}${failed}`;
    }
    if (reply.attempt) return `replayed ${reply.job} as attempt ${reply.attempt}`;
    return "done";
  }

  async function act(button) {
    if (readOnly) {
      flash("error", "The dashboard is read-only: GRIDQUEUE_DASHBOARD_TOKEN is not set.");
      return;
    }
    if (!token()) {
      flash("error", "Enter the dashboard token first (top right).");
      document.getElementById("token-input")?.focus();
      return;
    }
    let payload = button.dataset.body ? JSON.parse(button.dataset.body) : null;
    if (button.dataset.ask) {
      const answer = window.prompt(button.dataset.askLabel, button.dataset.askDefault || "");
      if (answer === null) return;
      if (!answer.trim() && button.dataset.askRequired) {
        flash("error", `A ${button.dataset.ask} is required.`);
        return;
      }
      payload = { ...(payload || {}), [button.dataset.ask]: answer.trim() || undefined };
    } else if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
      return;
    }
    button.disabled = true;
    try {
      const res = await fetch(button.dataset.url, {
        method: "POST",
        headers: {
          Authorization: `Bearer ${token()}`,
          Accept: "application/json",
          ...(payload ? { "Content-Type": "application/json" } : {}),
        },
        body: payload ? JSON.stringify(payload) : undefined,
      });
      const reply = await res.json().catch(() => ({}));
      if (res.ok) {
        flash("ok", describe(reply));
      } else {
        flash("error", reply.error || `HTTP ${res.status}`);
        if (res.status === 401) {
          sessionStorage.removeItem(TOKEN_KEY);
          showToken();
        }
      }
    } catch (err) {
      flash("error", `The request failed: ${err}`);
    } finally {
      button.disabled = false;
      refreshSoon();
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-url]");
    if (!button) return;
    ev.preventDefault();
    act(button);
  });

  // -- live updates ----------------------------------------------------------------------

  const WORKER_STATE = {
    worker_dead: "DEAD",
    worker_quarantined: "QUARANTINED",
    worker_probation: "PROBATION",
    worker_readmitted: "ALIVE",
    worker_released: "ALIVE",
    worker_stopped: "STOPPED",
  };
  const JOB_STATE = {
    submitted: "QUEUED",
    claimed: "RUNNING",
    requeued: "QUEUED",
    succeeded: "SUCCEEDED",
    replayed: "QUEUED",
  };

  function setState(attribute, key, state) {
    for (const el of document.querySelectorAll(`[${attribute}="${CSS.escape(key)}"]`)) {
      el.dataset.state = state;
      const badge = el.querySelector(":scope [data-field=state]");
      if (badge) {
        badge.textContent = state;
        badge.className = `badge s-${state.toLowerCase()}`;
      }
    }
  }

  // Events patched while a refetch is in flight: its HTML was rendered before them, so
  // they are patched again once it has replaced the live part.
  let sinceRefresh = [];

  // Patch what the event names now; the refetch that follows fills in the rest.
  function patch(event, again = false) {
    if (inFlight && !again) sinceRefresh.push(event);
    let workerState = WORKER_STATE[event.type];
    if (event.type === "worker_registered") workerState = event.state;
    if (workerState && event.worker) setState("data-worker", event.worker, workerState);
    let jobState = JOB_STATE[event.type];
    if (event.type === "ended") jobState = event.state;
    if (jobState && event.job) setState("data-job", event.job, jobState);
  }

  function concerns(event) {
    if (watch === "*") return true;
    const [kind, key] = [watch.slice(0, watch.indexOf(":")), watch.slice(watch.indexOf(":") + 1)];
    if (kind === "job") return event.job === key;
    if (kind === "worker") return event.worker === key;
    return true;
  }

  function logEvent(event) {
    const log = document.getElementById("event-log");
    if (!log) return;
    log.querySelector("li.muted")?.remove();
    const item = document.createElement("li");
    item.className = "fresh";
    item.dataset.eventId = event.id;
    item.dataset.type = event.type;
    const when = document.createElement("time");
    when.dataset.ts = event.ts;
    when.textContent = `${duration(serverNow() - Number(event.ts))} ago`;
    const type = document.createElement("span");
    type.className = `ev ev-${event.type}`;
    type.textContent = ` ${event.type} `;
    item.append(when, type);
    for (const [k, v] of Object.entries(event)) {
      if (["id", "type", "ts"].includes(k) || v === "") continue;
      const field = document.createElement("span");
      field.className = "kv";
      const name = document.createElement("span");
      name.className = "k";
      name.textContent = k;
      let value;
      if (k === "job" || k === "worker") {
        value = document.createElement("a");
        value.href = `/${k === "job" ? "jobs" : "workers"}/${encodeURIComponent(v)}`;
      } else {
        value = document.createElement("span");
      }
      value.textContent = v;
      field.append(name, "=", value, " ");
      item.append(field);
    }
    log.prepend(item);
    const max = Number(log.dataset.max) || 60;
    while (log.children.length > max) log.lastElementChild.remove();
  }

  let inFlight = false;
  let again = false;
  let lastRefresh = Date.now();
  let lastCost = 0; // how long the last refetch took, fetch and render
  let timer = null;

  function refreshSoon() {
    if (inFlight) {
      again = true;
      return;
    }
    // A page that is slow to fetch and render (a large fleet) refreshes less often, so
    // the browser stays free to patch what the events name at once.
    const wait = lastRefresh + Math.max(MIN_REFRESH_MS, 3 * lastCost) - Date.now();
    if (wait > 0) {
      if (!timer) {
        timer = setTimeout(() => {
          timer = null;
          refreshSoon();
        }, wait);
      }
      return;
    }
    refresh();
  }

  async function refresh() {
    const live = document.getElementById("live");
    if (!live) return;
    inFlight = true;
    sinceRefresh = [];
    lastRefresh = Date.now();
    try {
      const res = await fetch(location.pathname + location.search, {
        headers: { "X-Gridqueue-Fragment": "live" },
        cache: "no-store",
      });
      if (res.ok || res.status === 404) {
        const html = await res.text();
        const open = [...live.querySelectorAll("details[open][data-keep-open]")].map(
          (d) => d.dataset.keepOpen,
        );
        live.innerHTML = html;
        const late = sinceRefresh;
        sinceRefresh = [];
        for (const event of late) patch(event, true);
        for (const key of open) {
          live.querySelector(`details[data-keep-open="${CSS.escape(key)}"]`)?.setAttribute("open", "");
        }
        setServerNow(res.headers.get("X-Gridqueue-Now-Ms"));
        tickAges();
        layoutTimelines();
        body.dataset.refreshed = String(Date.now());
        lastCost = Date.now() - lastRefresh;
      }
    } catch (err) {
      // The next event or the idle timer tries again.
    } finally {
      inFlight = false;
      if (again) {
        again = false;
        refreshSoon();
      }
    }
  }

  function setLive(connected, why) {
    const mark = document.getElementById("live-status");
    if (!mark) return;
    mark.dataset.connected = connected ? "true" : "false";
    mark.title = connected ? "Live: following the ledger's transitions" : why || "Reconnecting...";
  }

  function connect() {
    if (!window.EventSource) return;
    const source = new EventSource("/api/stream");
    source.addEventListener("ready", () => {
      setLive(true);
      refreshSoon(); // whatever changed between the page load and the stream's start
    });
    source.addEventListener("failure", (ev) => {
      setLive(false, JSON.parse(ev.data).error);
    });
    source.onmessage = (ev) => {
      const event = JSON.parse(ev.data);
      patch(event);
      logEvent(event);
      if (concerns(event)) refreshSoon();
    };
    // The browser reconnects by itself, with Last-Event-ID: nothing is missed.
    source.onerror = () => setLive(false);
    window.addEventListener("pagehide", () => source.close());
  }

  // -- start -----------------------------------------------------------------------------

  setServerNow(body.dataset.nowMs);
  setupToken();
  tickAges();
  layoutTimelines();
  connect();
  setInterval(tickAges, 1000);
  setInterval(() => {
    if (document.visibilityState === "visible" && Date.now() - lastRefresh >= IDLE_REFRESH_MS) {
      refreshSoon();
    }
  }, 1000);
})();
