"""Where the hot path spends its time: py-spy on a worker's pool child and on the producer.

It starts the overhead benchmark's gridqueue setup (a private Redis, 2 workers x 2 slots,
a watchdog, the simulated handler with its run counts off), then keeps the producer
submitting no-op jobs in batches and awaiting their results while py-spy samples one pool
child of the first worker and the producer itself. It prints, for each, the functions that
hold the most samples (inclusive, then self), and can keep py-spy's raw stacks. Needs
py-spy (the dev extra); as root, or where ptrace of one's own children is allowed.

    python benchmarks/profile_hot_path.py [--seconds 12] [--rate 200] [--top 25]
        [--events] [--gil] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

BATCH = 100
Shares = list[tuple[float, str]]
# py-spy names a frame "function (file:line)": the line is dropped, to sum per function.
_LINE = re.compile(r":\d+\)$")
# gridqueue's frames and the handlers', but not the command line's (always on the stack).
OURS = re.compile(r"\((gridqueue/(?!cli\.py|worker\.py)|workers/)")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[dev]'")
    return found


def record(
    pid: int, out: Path, seconds: float, rate: int, gil: bool = False
) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` into ``out`` (collapsed stacks), in the background.
    ``gil``: only the samples of a thread that holds the GIL, so that a process's time
    spent waiting (on Redis, on its pool's pipe, in a parked thread) does not count."""
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(rate),
         "--duration", str(int(seconds)), "--format", "raw", "--output", str(out),
         *(["--gil"] if gil else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def top_lines(raw: Path, count: int) -> tuple[int, Shares, Shares, Shares]:
    """Total samples, and the ``count`` functions with the most samples, inclusive (on the
    stack) and self (at its top), as shares of all samples; then the same inclusive list
    for gridqueue's own functions (and the handlers'), below Celery's frames."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    share = max(total, 1)
    ours = Counter({f: n for f, n in inclusive.items() if OURS.search(f)})
    return (
        total,
        [(n / share, f) for f, n in inclusive.most_common(count)],
        [(n / share, f) for f, n in own.most_common(count)],
        [(n / share, f) for f, n in ours.most_common(count)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--events", action="store_true", help="Celery task events on")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument(
        "--gil", action="store_true", help="sample only threads holding the GIL (CPU, not waits)"
    )
    args = parser.parse_args()
    events = "true" if args.events else "false"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gridqueue-prof-")))
        out = args.keep or tmp
        out.mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(EmbeddedRedis())
        env = {"GRIDQUEUE_CELERY_EVENTS": events, "SIM_LLM_COUNT_RUNS": "0"}
        fleet = LocalFleet(url, tmp / "logs", env=env)
        stack.callback(fleet.stop_all)
        gq = GridQueue(settings=Settings(redis_url=url, celery_events=args.events))
        stack.callback(gq.close)
        workers = [fleet.start_worker(f"w{i}", concurrency=2) for i in range(2)]
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, ["w0", "w1"])
        gq.submit("sim-llm", {"prompt": "warm", "ms": 0}).result(timeout=30)
        children = workers[0].children()
        if not children:
            raise SystemExit("the worker has no pool child to sample")
        targets = {"worker pool child": children[0], "producer": os.getpid()}
        spies = {
            name: record(
                pid, out / f"{name.replace(' ', '_')}.txt", args.seconds, args.rate, args.gil
            )
            for name, pid in targets.items()
        }
        started, jobs = time.monotonic(), 0
        while time.monotonic() - started < args.seconds + 1:
            handles = [gq.submit("sim-llm", {"prompt": f"{i}", "ms": 0}) for i in range(BATCH)]
            for job in handles:
                job.result(timeout=60)
            jobs += BATCH
        elapsed = time.monotonic() - started
        for spy in spies.values():
            spy.wait(timeout=60)
        print(f"{jobs} jobs in {elapsed:.1f} s ({jobs / elapsed:.0f} jobs/s, sampled)")
        for name in targets:
            total, *lists = top_lines(out / f"{name.replace(' ', '_')}.txt", args.top)
            titles = ("inclusive", "self", "gridqueue's, inclusive")
            for title, shares in zip(titles, lists, strict=True):
                print(f"\n{name}: {total} samples; {title}")
                for share, frame in shares:
                    print(f"  {100 * share:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
