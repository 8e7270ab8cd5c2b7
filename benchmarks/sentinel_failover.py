"""Sentinel failover under load: acknowledged submits lost, and time to running again.

For each round: a private primary, one replica and three Sentinels
(``down-after-milliseconds 1000``); two workers (2 slots) and a watchdog that know only
the Sentinels; four producer threads submitting as fast as they can. After a few seconds
of load the primary is killed with SIGKILL; the Sentinels promote the replica and the
old primary comes back as its replica. It reports, per mode:

- acknowledged submits lost: ``submit()`` returned, and the promoted primary has no
  such job (asynchronous replication loses the primary's last writes; durable mode,
  ``GRIDQUEUE_REDIS_MIN_REPLICAS=1``, must lose none);
- kill -> promoted: when the Sentinels name the new primary;
- kill -> running again: the first attempt that starts on the promoted primary;
- every acknowledged job that survived ends (lost = 0, duplicates = 0 from the audit).

``--restart-as replica`` (the default) restarts the killed old primary as an operator
should: ``--replicaof`` the promoted one. ``--restart-as primary`` restarts it the careless
way, with no ``--replicaof``: it comes back empty and as a primary until the Sentinels
convert it, and ``--restart-after-s`` says when, counted from the kill (default: once the
replica is promoted). Restarted within ``down-after-milliseconds`` the Sentinels never see
the primary down, and its replica resyncs from the empty server.

SIGTERM and SIGINT end the run through its ``finally`` blocks: no worker, watchdog or
Redis server outlives an interrupted run (``timeout 60 python ...`` is safe).

    python benchmarks/sentinel_failover.py [--rounds 3] [--modes async,durable] [--json]
        [--restart-as replica|primary] [--restart-after-s S] [--rate SUBMITS_PER_S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gridqueue.audit import audit, percentile  # noqa: E402
from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded_sentinel import EmbeddedSentinelSet  # noqa: E402
from gridqueue.errors import GridQueueError, JobEndedError, JobNotFoundError  # noqa: E402
from gridqueue.fleet import LocalFleet  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

WORKERS = ("gpu-0", "gpu-1")
PRODUCERS = 4
LOAD_BEFORE_KILL_S = 4.0
LOAD_AFTER_PROMOTION_S = 4.0


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT: leave through the ``finally`` blocks, which stop the fleet and the
    Redis servers; a second signal during that clean-up is ignored, not obeyed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def one_round(
    durable: bool,
    log_dir: Path,
    restart_as: str = "replica",
    restart_after_s: float | None = None,
    rate: float = 0.0,
) -> dict[str, Any]:
    min_replicas = 1 if durable else 0
    with EmbeddedSentinelSet(replicas=1, sentinels=3, down_after_ms=1000) as ha:
        settings = Settings(
            redis_url=ha.url,
            redis_sentinel_master=ha.master_name,
            redis_min_replicas=min_replicas,
        )
        fleet = LocalFleet(ha.url, log_dir, env=ha.env(min_replicas))
        clients = [GridQueue(settings=settings) for _ in range(PRODUCERS)]
        acknowledged: list[tuple[float, str]] = []
        refused: dict[str, int] = {}
        stop = threading.Event()
        lock = threading.Lock()

        def produce(gq: GridQueue, me: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    job = gq.submit("sim-llm", {"prompt": f"p{me}-{n}", "ms": 50}, "batch")
                except GridQueueError as exc:
                    with lock:
                        refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
                    time.sleep(0.05)
                else:
                    with lock:
                        acknowledged.append((time.time(), job.id))
                    if rate:
                        time.sleep(PRODUCERS / rate)

        try:
            for name in WORKERS:
                fleet.start_worker(name, concurrency=2)
            fleet.start_watchdog()
            fleet.wait_alive(clients[0].ledger, list(WORKERS))
            threads = [
                threading.Thread(target=produce, args=(gq, i), daemon=True)
                for i, gq in enumerate(clients)
            ]
            for thread in threads:
                thread.start()
            time.sleep(LOAD_BEFORE_KILL_S)
            old = ha.kill_primary()
            # After the kill returned (the process is reaped): nothing starts on it past here.
            killed_at = time.time()
            if restart_after_s is not None:
                time.sleep(max(0.0, killed_at + restart_after_s - time.time()))
                ha.restart(old, None)
                restarted_s = time.time() - killed_at
                promoted_s: float | None
                try:
                    new = ha.wait_promoted(old, timeout_s=15)
                    promoted_s = time.time() - killed_at
                except GridQueueError:
                    new, promoted_s = old, None  # the Sentinels never saw it down: no failover
            else:
                new = ha.wait_promoted(old)
                promoted_s = time.time() - killed_at
                ha.restart(old, None if restart_as == "primary" else new)
                restarted_s = time.time() - killed_at
            ha.wait_replicas(1)
            time.sleep(LOAD_AFTER_PROMOTION_S)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

            gq = clients[0]
            ids = [job_id for _, job_id in acknowledged]
            lost_acknowledged = []
            survivors = []
            for job_id in ids:
                try:
                    gq.ledger.get(job_id)
                except JobNotFoundError:
                    lost_acknowledged.append(job_id)
                else:
                    survivors.append(job_id)
            for job_id in survivors:
                with contextlib.suppress(JobEndedError):
                    gq.job(job_id).result(timeout=120)
            report = audit(gq.ledger, survivors)
            killed_ms = int(killed_at * 1000)
            restarts = [
                a.started_ms
                for job_id in survivors
                for a in gq.ledger.get(job_id).attempts
                if a.started_ms is not None and a.started_ms > killed_ms
            ]
            running_again_s = (min(restarts) - killed_ms) / 1000 if restarts else None
            return {
                "mode": "durable" if durable else "async",
                "restart_as": restart_as,
                "restarted_s": round(restarted_s, 2),
                "primary_changes": [old, new, ha.primary_port()],
                "acknowledged": len(ids),
                "acknowledged_before_kill": sum(t < killed_at for t, _ in acknowledged),
                "lost_acknowledged": len(lost_acknowledged),
                "refused": refused,
                "promoted_s": None if promoted_s is None else round(promoted_s, 2),
                "running_again_s": None if running_again_s is None else round(running_again_s, 2),
                "audit_lost": len(report.lost),
                "audit_duplicates": len(report.duplicates),
                "succeeded": report.succeeded,
            }
        finally:
            stop.set()
            fleet.stop_all()
            for client in clients:
                client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="primary kills per mode")
    parser.add_argument("--modes", default="async,durable", help="async, durable or both")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--restart-as",
        choices=("replica", "primary"),
        default="replica",
        help="restart the killed primary with --replicaof (replica) or without (primary)",
    )
    parser.add_argument(
        "--restart-after-s",
        type=float,
        default=None,
        help="restart the killed primary this long after the kill (default: once promoted)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="submits per second, all producers together (default 0: as fast as they can; "
        "the backlog then takes minutes to drain)",
    )
    args = parser.parse_args()
    if args.rate < 0:
        parser.error("--rate takes submits per second >= 0")
    if args.restart_after_s is not None and args.restart_after_s < 0:
        parser.error("--restart-after-s takes a number of seconds >= 0")
    if args.restart_after_s is not None and args.restart_as != "primary":
        parser.error("--restart-after-s goes with --restart-as primary (a replica needs a primary)")
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"async", "durable"}:
        parser.error("--modes takes async, durable or both, comma-separated")
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gridqueue-sentinel-bench-") as tmp:
        for mode in modes:
            for n in range(args.rounds):
                result = one_round(
                    mode == "durable",
                    Path(tmp) / f"{mode}-{n}",
                    args.restart_as,
                    args.restart_after_s,
                    args.rate,
                )
                rounds.append(result)
                if not args.json:
                    print(json.dumps(result), flush=True)
    summary: dict[str, Any] = {}
    for mode in modes:
        mine = [r for r in rounds if r["mode"] == mode]
        again = [r["running_again_s"] for r in mine if r["running_again_s"] is not None]
        promoted = [r["promoted_s"] for r in mine if r["promoted_s"] is not None]
        summary[mode] = {
            "rounds": len(mine),
            "acknowledged": sum(r["acknowledged"] for r in mine),
            "lost_acknowledged": sum(r["lost_acknowledged"] for r in mine),
            "failovers": len(promoted),
            "promoted_s_p50": percentile(promoted, 50) if promoted else None,
            "running_again_s_p50": percentile(again, 50) if again else None,
            "running_again_s_max": max(again) if again else None,
            "audit_lost": sum(r["audit_lost"] for r in mine),
            "audit_duplicates": sum(r["audit_duplicates"] for r in mine),
        }
    if args.json:
        print(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
        return
    print()
    print(f"{'mode':8} {'acked':>7} {'lost acked':>10} {'promoted p50':>13} "
          f"{'running again p50/max':>22} {'audit lost/dup':>15}")  # fmt: skip
    for mode, s in summary.items():
        again = (
            f"{s['running_again_s_p50']:.2f}/{s['running_again_s_max']:.2f} s"
            if s["running_again_s_p50"] is not None
            else "-"
        )
        promoted_p50 = (
            f"{s['promoted_s_p50']:.2f} s" if s["promoted_s_p50"] is not None else "no failover"
        )
        print(
            f"{mode:8} {s['acknowledged']:>7} {s['lost_acknowledged']:>10} "
            f"{promoted_p50:>13} {again:>22} "
            f"{s['audit_lost']:>7}/{s['audit_duplicates']}"
        )


if __name__ == "__main__":
    main()
