"""The one seam to Redis: every key name gridqueue uses, in one place.

Layout (``ns`` is ``GRIDQUEUE_NAMESPACE``, ``gq`` by default; an attempt is ``<job>.<n>``)::

    {ns}:job:{job}             hash    the job record; attempt n lives in field ``a:{n}`` (JSON)
    {ns}:job:{job}:done        list    one token, pushed when the job ends (result() waits on it)
    {ns}:job:{job}:stream      stream  the job's output chunks: chunk i has id ``0-{i+1}``,
                                       then one end marker; created by the first chunk, it
                                       expires with the job record
    {ns}:idem:{key}            string  idempotency key -> job id
    {ns}:deadlines             zset    job -> deadline (ms, Redis server time)
    {ns}:dispatch              zset    attempt -> when it must be (re)published (ms)
    {ns}:published             zset    attempt -> when its message was published (ms), until
                                       it is claimed: the watchdog checks now and then that
                                       the message still exists (in its queue or unacked)
    {ns}:lost                  hash    attempt -> outcome, for attempts whose worker is gone;
                                       the watchdog applies the policy to each, crash-safe
    {ns}:liveness              zset    attempt -> when its liveness beat lapses (ms)
    {ns}:stalls                zset    attempt -> when its progress mark lapses (ms)
    {ns}:dead_letters          zset    dead-lettered job -> when (ms)
    {ns}:workers               zset    live worker -> last heartbeat (ms): the only copy
                                       of it while the worker is in the fleet
    {ns}:gone                  zset    dead or stopped worker -> when it left (ms); its keys
                                       are deleted job_retention_s later
    {ns}:worker:{name}         hash    worker record: state, epoch, models, pid, health...;
                                       last_heartbeat_ms once it left the fleet
    {ns}:worker:{name}:running set     attempts this worker runs
    {ns}:worker:{name}:kill    set     attempts the worker agent must SIGKILL
    {ns}:worker:{name}:faults  hash    simulated GPU faults injected by the drill (gpu -> JSON)
    {ns}:presence:{name}       channel nothing is published on it: the worker's main process
                                       holds a subscription on a connection of its own, so
                                       its subscriber count (PUBSUB NUMSUB) drops to 0 the
                                       moment that process dies and the kernel closes it
    {ns}:model:{model}         hash    worker -> {required_bytes, largest_gpu_bytes}: the
                                       workers that consume the model's queue now
    {ns}:model:{model}:unfit   hash    the same, for workers the model does not fit (they
                                       do not consume it; admission tells the user why)
    {ns}:probation             zset    worker -> end of its probation (ms)
    {ns}:health_changes        zset    worker -> when its health verdict changed (ms)
    {ns}:jobs:{state}          zset    job -> when it entered the state (ms): the job lists
                                       of the dashboard, and the counts by state (ZCARD);
                                       ended jobs leave with the retention
    {ns}:models                set     every model a worker has registered for
    {ns}:stats                 hash    counters (stale results discarded, requeues...)
    {ns}:minute:{m}            hash    the counters that feed rates (claims, requeues, ended
                                       attempts, quarantines...) for minute m
                                       (ms // 60000); expires after two hours
    {ns}:hist                  hash    histograms for /metrics:
                                       ``<metric>|<labels>|<le_ms or inf>`` -> count in
                                       that bucket (not cumulative), ``...|sum_ms``;
                                       a series' count is the sum of its buckets
    {ns}:events                stream  every transition, capped at ``events_max_len``;
                                       an event may carry a ``tally``: the counts and
                                       observations of the step that wrote it, which
                                       the stats fold adds to ``stats``, ``minute`` and
                                       ``hist``
    {ns}:stats:folded          hash    the stats fold's cursor: ``id`` of the last event it
                                       added, ``seen``: events up to it
    {ns}:incidents             stream  one entry per failover incident (worker declared
                                       dead, GPU quarantine, stall...): its last sign of
                                       life, the verdict, the attempts it moved
    {ns}:worker:{name}:history list    the worker's own events, newest first (capped)
    {ns}:worker:{name}:jobs    zset    job -> when the worker last claimed an attempt of it
                                       (ms): the dashboard's jobs-by-worker list (capped)
    {ns}:watchdog:leader       string  ``<owner>:<token>`` with a PX lease
    {ns}:watchdog:token        string  fencing token counter

kombu's own structures are named here too (``unacked``, ``unacked_index``), because a
requeue removes the dead worker's message from them.

The Lua scripts receive the same layout: :func:`lua_prelude` renders these templates as
Lua functions, so no script spells a key by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> (template, argument names). The template is a Python format string.
_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "job": ("{ns}:job:{job}", ("job",)),
    "job_done": ("{ns}:job:{job}:done", ("job",)),
    "job_stream": ("{ns}:job:{job}:stream", ("job",)),
    "idempotency": ("{ns}:idem:{key}", ("key",)),
    "deadlines": ("{ns}:deadlines", ()),
    "dispatch": ("{ns}:dispatch", ()),
    "published": ("{ns}:published", ()),
    "lost": ("{ns}:lost", ()),
    "liveness": ("{ns}:liveness", ()),
    "stalls": ("{ns}:stalls", ()),
    "dead_letters": ("{ns}:dead_letters", ()),
    "workers": ("{ns}:workers", ()),
    "gone": ("{ns}:gone", ()),
    "worker": ("{ns}:worker:{name}", ("name",)),
    "worker_running": ("{ns}:worker:{name}:running", ("name",)),
    "worker_kill": ("{ns}:worker:{name}:kill", ("name",)),
    "worker_faults": ("{ns}:worker:{name}:faults", ("name",)),
    "presence": ("{ns}:presence:{name}", ("name",)),
    "model": ("{ns}:model:{model}", ("model",)),
    "model_unfit": ("{ns}:model:{model}:unfit", ("model",)),
    "probation": ("{ns}:probation", ()),
    "health_changes": ("{ns}:health_changes", ()),
    "jobs_in_state": ("{ns}:jobs:{state}", ("state",)),
    "models": ("{ns}:models", ()),
    "minute": ("{ns}:minute:{m}", ("m",)),
    "hist": ("{ns}:hist", ()),
    "incidents": ("{ns}:incidents", ()),
    "worker_history": ("{ns}:worker:{name}:history", ("name",)),
    "worker_jobs": ("{ns}:worker:{name}:jobs", ("name",)),
    "stats": ("{ns}:stats", ()),
    "events": ("{ns}:events", ()),
    "folded": ("{ns}:stats:folded", ()),
    "leader": ("{ns}:watchdog:leader", ()),
    "leader_token": ("{ns}:watchdog:token", ()),
}

# kombu's Redis transport keeps unacked messages here (not namespaced by gridqueue).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


def queue_for_model(namespace: str, model: str) -> str:
    """The Celery queue that carries the attempts of one model (``gq.model.sim-llm``).

    It is namespaced like the ledger, so two deployments on one Redis database never
    consume each other's messages."""
    return f"{namespace}.model.{model}"


def attempt_id(job_id: str, attempt: int) -> str:
    """``<job>.<n>``: the attempt's ledger member and its Celery task id."""
    return f"{job_id}.{attempt}"


def split_attempt_id(member: str) -> tuple[str, int]:
    job_id, _, attempt = member.rpartition(".")
    return job_id, int(attempt)


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace."""

    ns: str

    def _render(self, template_name: str, /, **args: str) -> str:
        template, _ = _TEMPLATES[template_name]
        return template.format(ns=self.ns, **args)

    def job(self, job_id: str) -> str:
        return self._render("job", job=job_id)

    def job_done(self, job_id: str) -> str:
        return self._render("job_done", job=job_id)

    def job_stream(self, job_id: str) -> str:
        return self._render("job_stream", job=job_id)

    def idempotency(self, key: str) -> str:
        return self._render("idempotency", key=key)

    def worker(self, name: str) -> str:
        return self._render("worker", name=name)

    def worker_running(self, name: str) -> str:
        return self._render("worker_running", name=name)

    def worker_kill(self, name: str) -> str:
        return self._render("worker_kill", name=name)

    def worker_faults(self, name: str) -> str:
        return self._render("worker_faults", name=name)

    def presence(self, name: str) -> str:
        return self._render("presence", name=name)

    def model(self, model: str) -> str:
        return self._render("model", model=model)

    def model_unfit(self, model: str) -> str:
        return self._render("model_unfit", model=model)

    @property
    def probation(self) -> str:
        return self._render("probation")

    @property
    def health_changes(self) -> str:
        return self._render("health_changes")

    @property
    def deadlines(self) -> str:
        return self._render("deadlines")

    @property
    def dispatch(self) -> str:
        return self._render("dispatch")

    @property
    def published(self) -> str:
        return self._render("published")

    @property
    def lost(self) -> str:
        return self._render("lost")

    @property
    def liveness(self) -> str:
        return self._render("liveness")

    @property
    def stalls(self) -> str:
        return self._render("stalls")

    @property
    def dead_letters(self) -> str:
        return self._render("dead_letters")

    @property
    def workers(self) -> str:
        return self._render("workers")

    @property
    def gone(self) -> str:
        return self._render("gone")

    def jobs_in_state(self, state: str) -> str:
        return self._render("jobs_in_state", state=state)

    @property
    def models(self) -> str:
        return self._render("models")

    def minute(self, minute: int) -> str:
        return self._render("minute", m=str(minute))

    @property
    def hist(self) -> str:
        return self._render("hist")

    @property
    def incidents(self) -> str:
        return self._render("incidents")

    def worker_history(self, name: str) -> str:
        return self._render("worker_history", name=name)

    def worker_jobs(self, name: str) -> str:
        return self._render("worker_jobs", name=name)

    @property
    def stats(self) -> str:
        return self._render("stats")

    @property
    def events(self) -> str:
        return self._render("events")

    @property
    def folded(self) -> str:
        return self._render("folded")

    @property
    def leader(self) -> str:
        return self._render("leader")

    @property
    def leader_token(self) -> str:
        return self._render("leader_token")


def lua_prelude() -> str:
    """Lua functions ``key_<name>(ns, ...)`` rendered from the same templates."""
    lines = [
        f"local KOMBU_UNACKED = '{KOMBU_UNACKED}'",
        f"local KOMBU_UNACKED_INDEX = '{KOMBU_UNACKED_INDEX}'",
    ]
    for name, (template, params) in _TEMPLATES.items():
        parts: list[str] = []
        rest = template
        while rest:
            start = rest.find("{")
            if start < 0:
                parts.append(repr(rest))
                break
            if start:
                parts.append(repr(rest[:start]))
            end = rest.index("}", start)
            parts.append(rest[start + 1 : end])
            rest = rest[end + 1 :]
        signature = ", ".join(("ns", *params))
        lines.append(f"local function key_{name}({signature}) return {' .. '.join(parts)} end")
    return "\n".join(lines) + "\n"
