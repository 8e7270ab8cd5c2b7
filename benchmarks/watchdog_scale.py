"""Watchdog tick cost against the number of jobs, workers and attempts in flight.

It fills a private Redis through the ledger (no worker processes: the tick only reads the
ledger's indexes), then times ``Watchdog.tick()`` when nothing is due. A tick runs range
queries over what is due, so its cost must stay flat as the ledger grows; the largest
ledger is compared with the smallest, measured in the same run.

    python benchmarks/watchdog_scale.py [--sizes 1000,10000,50000] [--json]

``--fleet`` measures the watchdog under a live fleet instead: ``--workers`` simulated
workers (10,000 by default) heartbeating every ``heartbeat_interval_s`` through the real
``heartbeat.lua``, called as the ledger calls it (FCALL, or EVALSHA) from ``--procs`` load
processes, not one process per worker, in pipelines of ``--batch`` beats spread evenly
over the interval; with ``--spread``, each beat of a batch on a connection of its own
instead, one beat a round trip, as separate workers send them (a pipeline of 100 shares
one round trip's handling among 100 beats, which a real fleet never does); and
``--attempts`` attempts in
flight (100,000), under the default settings (stale_after_s 1 s, the connection signal
on). A beat carries the eight-GPU
health document every ``--health-every-s`` (the agent's ``health_refresh_s``, 5 s; 0 for
every beat, as agents did before they sent it only on news). It reports the idle tick's
p50/p99/max and its blind ticks (ticks that judged no one), the heartbeat rate the load
reached, and the Redis server's CPU over the window (``INFO cpu``), per heartbeat and in
cores.

``--rack N`` then silences N workers at once (a rack losing power: their presence
subscriptions are absent, so only the heartbeat signal applies), 10 attempts each at the
defaults, and ticks until every attempt they ran is published again (20 s at most). It
reports, from
each worker's last heartbeat (``last_heartbeat_ms``, Redis time): the verdict (the
incident's ``verdict_ms - sign_ms``) and the next attempt's publish (its score in the
published index), p50/p99/max, and the blind ticks. The attempts are ``realtime`` jobs,
retried without backoff; a ``batch`` job would add its backoff by policy.

    python benchmarks/watchdog_scale.py --fleet [--workers 10000] [--attempts 100000]
        [--procs 3] [--batch 100] [--spread] [--window-s 20] [--health-every-s 5]
        [--rack 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import attempt_id  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis, dumps  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402
from gridqueue.watchdog import Watchdog  # noqa: E402

TICKS = 200


def fill(watchdog: Watchdog, jobs: int, workers: int) -> None:
    ledger = watchdog.ledger
    names = [f"node-{i}" for i in range(workers)]
    fit = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}
    for name in names:
        ledger.register(name, ["sim-llm"], 1, "bench", 4, "{}", model_fit=fit)
    payload = dumps({"prompt": "x", "ms": 1})
    for i in range(jobs):
        job_id = f"job-{i}"
        ledger.submit(job_id, "sim-llm", "batch", payload, 3_600_000, None)
        if i % 2 == 0:  # half of them running, spread over the workers
            ledger.claim(job_id, 1, names[i % workers], 1000 + i, f"tag-{i}")
            ledger.beat(job_id, 1, names[i % workers], 3_600_000)
            ledger.progress(job_id, 1, names[i % workers], "", 3_600_000)
        # the rest stay queued with their dispatch promise far in the future
        ledger.client.zadd(ledger.keys.dispatch, {attempt_id(job_id, 1): 9e15})


def measure(url: str, jobs: int, workers: int) -> dict[str, Any]:
    # Nothing may fall due while we measure: an hour of staleness and dispatch grace.
    settings = Settings(redis_url=url, stale_after_s=3600, dispatch_grace_s=3600)
    watchdog = Watchdog(settings, owner="bench")
    watchdog.ledger.client.flushall()
    fill(watchdog, jobs, workers)
    watchdog.tick()  # take the lease
    watchdog._blind_until = 0.0  # judge from the first measured tick on
    durations = []
    for _ in range(TICKS):
        started = time.perf_counter()
        report = watchdog.tick()
        durations.append(time.perf_counter() - started)
        assert report.leader and report.dispatched == 0
    return {
        "jobs": jobs,
        "running": (jobs + 1) // 2,
        "workers": workers,
        "tick_median_ms": round(statistics.median(durations) * 1000, 3),
        "tick_p99_ms": round(sorted(durations)[int(TICKS * 0.99) - 1] * 1000, 3),
    }


GIB = 2**30
# One node's health document as the agent sends it: eight GPUs, about 1.7 kB of JSON.
GPU = {
    "index": 0, "uuid": "GPU-0", "name": "Simulated H100", "memory_total_bytes": 80 * GIB,
    "memory_used_bytes": 9 * GIB, "utilization_ratio": 0.5, "temperature_c": 61.0,
    "power_w": 300.0, "xid_counts": {"13": 2},
}  # fmt: skip
HEALTH = json.dumps(
    {"probe": "simulated", "note": "", "verdict": "HEALTHY", "reasons": [],
     "unresponsive": False, "error": None, "gpus": [GPU] * 8},
    separators=(",", ":"),
)  # fmt: skip


def fleet_fill(
    watchdog: Watchdog, workers: int, attempts: int, workload: str = "realtime"
) -> dict[str, int]:
    """Register the fleet and put ``attempts`` attempts in flight on it, in pipelines.
    Attempt i runs on node-(i % workers). ``realtime`` jobs are retried at once (no
    backoff), so a lost one is published again as soon as its node is declared dead."""
    ledger = watchdog.ledger
    settings = ledger.settings
    slots = max(1, -(-attempts // workers))
    fit = json.dumps({"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}})
    names = [f"node-{i}" for i in range(workers)]
    epochs: dict[str, int] = {}
    for start in range(0, workers, 1000):
        pipe = ledger.client.pipeline(transaction=False)
        batch = names[start : start + 1000]
        for name in batch:
            ledger.queue_call(
                pipe, "register", name, "sim-llm", 1, "bench", slots, "{}", "simulated",
                "[]", fit, int(settings.stale_after_s * 1000),
            )  # fmt: skip
        for name, reply in zip(batch, pipe.execute(), strict=True):
            epochs[name] = int(reply[0])
    payload = dumps({"prompt": "x", "ms": 1})
    hour_ms = 3_600_000
    for start in range(0, attempts, 2000):
        pipe = ledger.client.pipeline(transaction=False)
        for i in range(start, min(attempts, start + 2000)):
            job_id, worker = f"job-{i}", names[i % workers]
            ledger.queue_call(
                pipe, "submit", job_id, "sim-llm", workload, payload, hour_ms, "",
                settings.job_retention_s, hour_ms, "1", hour_ms, hour_ms,
            )  # fmt: skip
            ledger.queue_call(pipe, "claim", job_id, 1, worker, 1000 + i, f"tag-{i}", hour_ms)
        for reply in pipe.execute()[1::2]:
            assert reply[0] == "ok", reply
    return epochs


def heartbeat_load(
    url: str, epochs: dict[str, int], load: dict[str, Any], stop_at: Any, beats: Any,
    silence_at: Any,
) -> None:  # fmt: skip
    """One load process: its workers beat every interval, in small pipelines spread evenly
    over it, as a fleet of separate workers would (one large pipeline a period would keep
    Redis busy for tens of ms at a time, and the watchdog's tick would wait behind it).

    The commands are packed once, so the process spends its time sending them: the real
    ``heartbeat.lua`` as the ledger calls it (FCALL, or EVALSHA), with a worker's arguments.
    Each batch carries the health document every ``health_every_s`` (0: on every beat),
    the batches out of phase. With ``load["spread"]`` the beats of a batch go out each on a
    connection of its own, all of them before any reply is read. From
    ``silence_at`` (shared, monotonic) on, the workers of ``load["rack"]`` beat no more;
    at ``stop_at`` (shared too) the process ends.
    """
    settings = Settings(redis_url=url)
    ledger = Ledger(connect_redis(url), settings)
    names = list(epochs)
    size, rack = load["batch"], set(load["rack"])
    batches = [names[i : i + size] for i in range(0, len(names), size)]
    # A pipeline's beats share one connection; spread, each has one of its own (from a pool
    # of their own: the ledger's client keeps its default bound of 100).
    width = size if load["spread"] else 1
    pool = redis.ConnectionPool.from_url(url, decode_responses=True, max_connections=width)
    connections = [pool.get_connection("FCALL") for _ in range(width)]

    def one(name: str, health: str) -> Any:
        return ledger.scripts.command(
            "heartbeat",
            ledger.argv("heartbeat", *ledger.heartbeat_args(name, epochs[name], health, "HEALTHY")),
        )

    def packed(batch: list[str], health: str) -> list[list[bytes]]:
        """What each connection sends for this batch."""
        if load["spread"]:
            return [connections[0].pack_commands([one(name, health)]) for name in batch]
        return [connections[0].pack_commands(one(name, health) for name in batch)]

    plain = [packed(batch, "") for batch in batches]
    with_health = [packed(batch, HEALTH) for batch in batches]
    silenced = [packed([n for n in batch if n not in rack], "") for batch in batches]
    lengths = [len(batch) for batch in batches]
    lengths_silenced = [sum(1 for n in batch if n not in rack) for batch in batches]
    interval_s, health_every_s = load["interval_s"], load["health_every_s"]
    slot_s = interval_s / len(batches)
    started = time.monotonic()
    next_health = [started + health_every_s * i / len(batches) for i in range(len(batches))]
    sent = 0
    tick = 0
    while time.monotonic() < stop_at.value:
        i = tick % len(batches)
        due = started + tick * slot_s
        time.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        if now >= silence_at.value:
            commands, count = silenced[i], lengths_silenced[i]
        elif now >= next_health[i]:
            commands, count = with_health[i], lengths[i]
            next_health[i] = now + health_every_s
        else:
            commands, count = plain[i], lengths[i]
        if count:
            for connection, command in zip(connections, commands, strict=False):
                connection.send_packed_command(command)
            per_connection = 1 if load["spread"] else count
            for connection, _ in zip(connections, commands, strict=False):
                for _ in range(per_connection):
                    sent += connection.read_response()[0] == "ok"
        tick += 1
        if i == len(batches) - 1:
            with beats.get_lock():
                beats.value += sent
            sent = 0


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    at = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return {
        "p50": round(ordered[len(ordered) // 2] * scale, 3),
        "p99": round(at * scale, 3),
        "max": round(ordered[-1] * scale, 3),
    }


def _tick(watchdog: Watchdog, durations: list[float]) -> tuple[Any, bool]:
    """One tick, timed; and whether it judged nobody (a blind tick)."""
    started_monotonic = time.monotonic()
    started = time.perf_counter()
    report = watchdog.tick()
    durations.append(time.perf_counter() - started)
    return report, watchdog._blind_until > started_monotonic


def _published(ledger: Ledger, jobs: list[str]) -> dict[str, float]:
    """When each job's second attempt was published (Redis time, ms), if it was."""
    pipe = ledger.client.pipeline(transaction=False)
    for job in jobs:
        pipe.zscore(ledger.keys.published, attempt_id(job, 2))
    scores = pipe.execute()
    return {job: score for job, score in zip(jobs, scores, strict=True) if score is not None}


def rack_failure(
    watchdog: Watchdog, rack: list[str], attempts: int, workers: int, silence_at: Any
) -> dict[str, Any]:
    """Silence the rack's workers at once and tick until every attempt they ran is
    published again: from each worker's last heartbeat to its attempts' next publish."""
    ledger, settings = watchdog.ledger, watchdog.ledger.settings
    client = ledger.client
    # fleet_fill put attempt i on node-(i % workers), and the rack is the first workers.
    names = {f"job-{i}": f"node-{i % workers}" for i in range(attempts) if i % workers < len(rack)}
    jobs = list(names)
    durations: list[float] = []
    blind = dead = requeued = dispatched = 0
    silence_at.value = time.monotonic()
    give_up_at = silence_at.value + 20 * settings.stale_after_s
    published: dict[str, float] = {}
    while time.monotonic() < give_up_at:
        report, was_blind = _tick(watchdog, durations)
        blind += was_blind
        dead += report.workers_declared_dead
        requeued += report.attempts_requeued
        dispatched += report.dispatched
        if requeued >= len(jobs):
            published = _published(ledger, jobs)
            if len(published) == len(jobs):
                break
        time.sleep(max(0.0, settings.watchdog_tick_s - durations[-1]))
    published = published or _published(ledger, jobs)  # those out when it gave up
    pipe = client.pipeline(transaction=False)
    for name in rack:
        pipe.hget(ledger.keys.worker(name), "last_heartbeat_ms")
    last_beat = dict(zip(rack, (float(ms or 0) for ms in pipe.execute()), strict=True))
    verdicts = [
        float(fields["verdict_ms"]) - float(fields["sign_ms"])
        for _, fields in client.xrange(ledger.keys.incidents)
        if fields.get("worker") in last_beat
    ]
    delays = [published[job] - last_beat[names[job]] for job in published]
    return {
        "rack_workers": len(rack),
        "rack_attempts": len(jobs),
        "declared_dead": dead,
        "requeued": requeued,
        "republished": len(published),
        "seconds": round(time.monotonic() - silence_at.value, 1),
        "ticks": len(durations),
        "blind_ticks": blind,
        "tick_ms": _percentiles(durations, 1000),
        "detect_ms": _percentiles(verdicts),
        "beat_to_republish_ms": _percentiles(delays),
    }


def measure_fleet(
    url: str, workers: int, attempts: int, procs: int, window_s: float, health_every_s: float,
    batch: int, rack: int, spread: bool = False,
) -> dict[str, Any]:  # fmt: skip
    settings = Settings(redis_url=url)
    watchdog = Watchdog(settings, owner="bench")
    watchdog.ledger.client.flushall()
    filled_at = time.monotonic()
    epochs = fleet_fill(watchdog, workers, attempts)
    fill_s = time.monotonic() - filled_at
    names = list(epochs)
    beats = multiprocessing.Value("q", 0)
    silence_at = multiprocessing.Value("d", float("inf"))
    warmup_s = settings.stale_after_s + 1.0
    rack_names = names[:rack]
    stop_at = multiprocessing.Value("d", float("inf"))
    shares = [{n: epochs[n] for n in names[i::procs]} for i in range(procs)]
    load = {
        "interval_s": settings.heartbeat_interval_s, "health_every_s": health_every_s,
        "batch": batch, "rack": rack_names, "spread": spread,
    }  # fmt: skip
    loaders = [
        multiprocessing.Process(
            target=heartbeat_load, args=(url, share, load, stop_at, beats, silence_at)
        )
        for share in shares
    ]
    for loader in loaders:
        loader.start()
    try:
        # The watchdog runs while the fleet starts: it takes the lease, and applies the
        # first verdict that each worker's first beat queued (a start-up burst, not the
        # idle tick). Then every worker has beaten since the fill.
        client = watchdog.ledger.client
        warmup_ends = time.monotonic() + warmup_s
        while time.monotonic() < warmup_ends or client.zcard(watchdog.ledger.keys.health_changes):
            watchdog.tick()
            time.sleep(settings.watchdog_tick_s)
        watchdog._blind_until = 0.0  # judge from the first measured tick on
        cpu_before, beats_before, started = _redis_cpu_s(client), beats.value, time.monotonic()
        durations: list[float] = []
        dead = blind = 0
        while time.monotonic() - started < window_s:
            report, was_blind = _tick(watchdog, durations)
            dead += report.workers_declared_dead
            blind += was_blind
            time.sleep(max(0.0, settings.watchdog_tick_s - durations[-1]))
        elapsed = time.monotonic() - started
        cpu_s = _redis_cpu_s(client) - cpu_before
        beat_count = beats.value - beats_before
        failure = (
            rack_failure(watchdog, rack_names, attempts, workers, silence_at) if rack else None
        )
        watchdog.announcer.drain(30.0)  # the node-lost events it held during the requeue
    finally:
        stop_at.value = 0.0
        for loader in loaders:
            loader.join(timeout=30)
            if loader.is_alive():
                loader.kill()
    rate = beat_count / elapsed
    ticks = _percentiles(durations, 1000)
    return {
        "workers": workers,
        "attempts_in_flight": attempts,
        "fill_s": round(fill_s, 1),
        "batch": batch,
        "spread": spread,
        "heartbeat_rate_per_s": round(rate),
        "heartbeat_rate_wanted_per_s": round(workers / settings.heartbeat_interval_s),
        "health_every_s": health_every_s,
        "ticks": len(durations),
        "tick_p50_ms": ticks["p50"],
        "tick_p99_ms": ticks["p99"],
        "tick_max_ms": ticks["max"],
        "blind_ticks": blind,
        "workers_declared_dead": dead,
        "redis_cpu_cores": round(cpu_s / elapsed, 3),
        "redis_cpu_us_per_heartbeat": round(cpu_s / max(1, beat_count) * 1e6, 2),
        "redis_cpu_cores_at_wanted_rate": round(
            cpu_s / max(1, beat_count) * workers / settings.heartbeat_interval_s, 3
        ),
        "rack_failure": failure,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fleet", action="store_true", help="a heartbeating fleet instead")
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--attempts", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument(
        "--health-every-s", type=float, default=Settings().health_refresh_s,
        help="how often a worker's beat carries its health document (0: every beat)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=100, help="heartbeats per pipeline")
    parser.add_argument(
        "--spread", action="store_true",
        help="each beat of a batch on its own connection: one beat a round trip",
    )  # fmt: skip
    parser.add_argument("--rack", type=int, default=0, help="then silence this many workers")
    args = parser.parse_args()
    if args.fleet:
        with EmbeddedRedis() as url:
            row = measure_fleet(
                url, args.workers, args.attempts, args.procs, args.window_s,
                args.health_every_s, args.batch, args.rack, args.spread,
            )  # fmt: skip
        sending = (
            f"batches of {row['batch']}, each beat its own round trip"
            if row["spread"]
            else f"pipelines of {row['batch']}"
        )
        print(
            f"{row['workers']} workers, {row['attempts_in_flight']} attempts in flight: "
            f"heartbeats {row['heartbeat_rate_per_s']}/s of {row['heartbeat_rate_wanted_per_s']}"
            f"/s wanted ({sending}, health every {row['health_every_s']:g} s);"
            f" idle tick p50 {row['tick_p50_ms']:.2f} ms, p99 {row['tick_p99_ms']:.2f} ms, max "
            f"{row['tick_max_ms']:.2f} ms over {row['ticks']} ticks; blind ticks "
            f"{row['blind_ticks']}; declared dead {row['workers_declared_dead']}"
        )
        print(
            f"Redis CPU {row['redis_cpu_cores']:.2f} cores, "
            f"{row['redis_cpu_us_per_heartbeat']:.1f} us per heartbeat (all of Redis's work "
            f"in the window over the beats), {row['redis_cpu_cores_at_wanted_rate']:.2f} "
            f"cores at the wanted rate"
        )
        rack = row["rack_failure"]
        if rack:
            print(
                f"rack failure: {rack['rack_workers']} workers silent, {rack['rack_attempts']} "
                f"attempts on them; declared dead {rack['declared_dead']}, requeued "
                f"{rack['requeued']}, republished {rack['republished']} in {rack['seconds']} s; "
                f"last heartbeat to "
                f"verdict (ms) {rack['detect_ms']}; last heartbeat to republished (ms) "
                f"{rack['beat_to_republish_ms']}; ticks (ms) {rack['tick_ms']}, blind ticks "
                f"{rack['blind_ticks']} of {rack['ticks']}"
            )
        if args.json:
            print(json.dumps(row, indent=2))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with EmbeddedRedis() as url:
        for jobs in sizes:
            workers = max(10, jobs // 100)
            rows.append(measure(url, jobs, workers))
            print(
                f"{rows[-1]['jobs']:>7} jobs ({rows[-1]['running']} running) on "
                f"{workers:>4} workers: tick median {rows[-1]['tick_median_ms']:.2f} ms, "
                f"p99 {rows[-1]['tick_p99_ms']:.2f} ms",
                flush=True,
            )
    ratio = rows[-1]["tick_median_ms"] / rows[0]["tick_median_ms"]
    print(f"largest / smallest ledger: {ratio:.2f}x tick cost for {sizes[-1] / sizes[0]:.0f}x jobs")
    if args.json:
        print(json.dumps({"rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
