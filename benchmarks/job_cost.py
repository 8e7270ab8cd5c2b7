"""Redis CPU of one job, step by step: what each step's own work costs, and what its round
trip adds.

``benchmarks/overhead.py`` measures a whole fleet; this prices the steps one job takes
through Redis, each in isolation on a private Redis, so that the figure can be read
against its parts:

- gridqueue: ``submit`` (the script, with attempt 1's Celery message), the **take** (the
  message popped from its queue, then kombu's record of the delivery in ``unacked``, as
  kombu's Redis transport does it: one pipeline of ``ZADD`` and ``HSET`` in ``MULTI``),
  ``claim``, ``complete``, and ``result()``'s read (one ``HMGET``);
- bare Celery (acks_late, no results), the same way: the publish (``LPUSH``), the same
  take, and the ack (``ZREM`` and ``HDEL`` in ``MULTI``).

``BRPOP`` is priced as ``RPOP``: with a message waiting, it does the same work. It needs
Redis 7 or later, where the ledger's scripts are one function library (on 6.2 each call
by ``EVALSHA`` would bring its own ``SCRIPT EXISTS`` round trip into the figures).

Each step runs for a batch of jobs twice: pipelined (every call of the batch in one
write, so the figure is the step's own work) and alone (one call per round trip, as a
producer or a worker sends it). CPU is Redis's own (``INFO cpu``, user + sys), not the
wall-clock time of ``INFO commandstats``, which counts the time Redis waited for a core
on a busy machine. The two ways take turns, round after round, and the median is
reported. The difference between the two is what a round trip costs Redis to handle,
whatever it carries.

``--baseline REV`` adds gridqueue's steps as revision REV's scripts run them (its function
library, loaded beside today's on the same Redis and called with the same arguments), in
the same rounds: a before and after of the scripts that a noisy machine weighs on alike.

    python benchmarks/job_cost.py [--jobs 500] [--rounds 9] [--baseline REV] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.ledger_ceiling import command_usec, redis_cpu_s  # noqa: E402
from gridqueue.client import GridQueue  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, attempt_id  # noqa: E402
from gridqueue.records import ENDING_FIELDS  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

MODEL = "sim-llm"
WORKER = "node-0"
# A step: what it sends for one job, on a client or a pipeline (the same commands).
Send = Callable[[Any, "Job"], None]


class Job:
    def __init__(self, gq: GridQueue) -> None:
        self.id = uuid.uuid4().hex
        self.tag = str(uuid.uuid4())
        self.queue = ""
        self.body = ""
        self.gq = gq


def _commands(client: redis.Redis) -> int:
    return sum(calls for calls, _ in command_usec(client).values())


def _in_multi(conn: Any, *commands: tuple[Any, ...]) -> None:
    """``commands`` in MULTI/EXEC, as kombu sends them: one round trip of their own when
    ``conn`` is a client, queued among the rest when it is a pipeline."""
    if isinstance(conn, redis.client.Pipeline):
        for command in (("MULTI",), *commands, ("EXEC",)):
            conn.execute_command(*command)
        return
    record = conn.pipeline(transaction=True)
    for command in commands:
        record.execute_command(*command)
    record.execute()


def _take(conn: Any, job: Job) -> None:
    """kombu's Redis transport on delivery: the pop, then the delivery's record."""
    conn.rpop(job.queue)
    _in_multi(
        conn,
        ("ZADD", KOMBU_UNACKED_INDEX, 1.0, job.tag),
        ("HSET", KOMBU_UNACKED, job.tag, job.body),
    )


def _ack(conn: Any, job: Job) -> None:
    """kombu's ack of a delivery: its record removed, in MULTI."""
    _in_multi(conn, ("ZREM", KOMBU_UNACKED_INDEX, job.tag), ("HDEL", KOMBU_UNACKED, job.tag))


# Prints a revision's function library as JSON, run in a checkout of that revision.
_LIBRARY_AT = (
    "import json, sys; sys.path.insert(0, '.'); from gridqueue.ledger import _SCRIPTS; "
    "from gridqueue.lua import library; lib = library(_SCRIPTS); "
    "print(json.dumps({'text': lib.text, 'functions': dict(lib.functions)}))"
)


def library_at(revision: str) -> dict[str, Any]:
    """Revision ``revision``'s function library: its text and its functions' names."""
    with tempfile.TemporaryDirectory(prefix="gridqueue-baseline-") as tree:
        archive = subprocess.run(
            ["git", "archive", revision], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        printed = subprocess.run(
            [sys.executable, "-c", _LIBRARY_AT], cwd=tree, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    return dict(json.loads(printed))


def gridqueue_steps(gq: GridQueue, functions: dict[str, str] | None = None) -> dict[str, Send]:
    """gridqueue's steps; ``functions``: another library's functions to call instead of
    the ledger's own (loaded on the same Redis, taking the same arguments)."""
    ledger = gq.ledger
    stale_ms = int(gq.settings.stale_after_s * 1000)

    def call(conn: Any, name: str, *args: str | int) -> None:
        if functions is None:
            ledger.queue_call(conn, name, *args)
        else:
            conn.execute_command("FCALL", functions[name], 0, *ledger.argv(name, *args))

    def submit(conn: Any, job: Job) -> None:
        message = gq.dispatcher.render(attempt_id(job.id, 1), MODEL, "realtime")
        assert message is not None  # the broker is this Redis: the submit publishes it
        args = ledger.submit_args(job.id, MODEL, "realtime", '{"prompt": "hi", "ms": 0}', 0, None)
        call(conn, "submit", *args, *message.args)

    def claim(conn: Any, job: Job) -> None:
        call(conn, "claim", job.id, 1, WORKER, 4242, job.tag, stale_ms)

    def complete(conn: Any, job: Job) -> None:
        call(conn, "complete", job.id, 1, WORKER, f'"{job.id}.1 succeeded"')

    def result(conn: Any, job: Job) -> None:
        conn.hmget(ledger.keys.job(job.id), ENDING_FIELDS)

    return {"submit": submit, "take": _take, "claim": claim, "complete": complete, "result": result}


def bare_steps(gq: GridQueue) -> dict[str, Send]:
    def publish(conn: Any, job: Job) -> None:
        conn.lpush(job.queue, job.body)

    return {"publish": publish, "take": _take, "ack": _ack}


def run_batch(
    client: redis.Redis, steps: dict[str, Send], jobs: list[Job], pipelined: bool
) -> dict[str, tuple[float, float]]:
    """Each step for every job of the batch; per step, Redis CPU µs and commands per job.

    A script queued on a pipeline runs when the pipeline does; sent alone, a pipeline of
    one call is one round trip, as the ledger's own call is."""
    spent: dict[str, tuple[float, float]] = {}
    for name, send in steps.items():
        cpu0, commands0 = redis_cpu_s(client), _commands(client)
        if pipelined:
            pipe = client.pipeline(transaction=False)
            for job in jobs:
                send(pipe, job)
            pipe.execute()
        else:
            for job in jobs:
                if name in ("take", "ack", "result", "publish"):
                    send(client, job)
                else:  # a script: queued on a pipeline of its own, one round trip
                    pipe = client.pipeline(transaction=False)
                    send(pipe, job)
                    pipe.execute()
        cpu1, commands1 = redis_cpu_s(client), _commands(client)
        # Between the two readings of commandstats: the first reading itself (a reading
        # counts in the next one, not in its own) and the INFO cpu of the second.
        spent[name] = ((cpu1 - cpu0) * 1e6 / len(jobs), (commands1 - commands0 - 2) / len(jobs))
    return spent


def measure(jobs_per_batch: int, rounds: int, baseline: str | None = None) -> dict[str, Any]:
    then = library_at(baseline) if baseline else None
    with EmbeddedRedis() as url:
        settings = Settings(redis_url=url)
        gq = GridQueue(settings=settings)
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            fit = {MODEL: {"required_bytes": 1, "largest_gpu_bytes": 2}}
            epoch = gq.ledger.register(WORKER, [MODEL], 4242, "bench", 4, "{}", model_fit=fit)
            gq.ledger.heartbeat(WORKER, epoch)
            probe = gq.dispatcher.render(attempt_id("probe", 1), MODEL, "realtime")
            assert probe is not None
            queue, body = probe.args[1], probe.args[2]  # its LPUSH: the queue and the body
            kinds = {"gridqueue": gridqueue_steps(gq), "bare Celery": bare_steps(gq)}
            if then is not None:
                client.function_load(then["text"], replace=True)
                kinds[f"gridqueue at {baseline}"] = gridqueue_steps(gq, then["functions"])
            samples: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = {
                kind: {way: {} for way in ("pipelined", "alone")} for kind in kinds
            }
            for round_ in range(rounds + 1):  # the first round warms up, uncounted
                order = ("pipelined", "alone") if round_ % 2 else ("alone", "pipelined")
                for kind, steps in kinds.items():
                    for way in order:
                        batch = [Job(gq) for _ in range(jobs_per_batch)]
                        for job in batch:
                            job.queue, job.body = queue, body
                        spent = run_batch(client, steps, batch, way == "pipelined")
                        if round_:
                            for step, figures in spent.items():
                                samples[kind][way].setdefault(step, []).append(figures)
        finally:
            client.close()
            gq.close()
    report: dict[str, Any] = {"jobs_per_batch": jobs_per_batch, "rounds": rounds, "kinds": {}}
    for kind, ways in samples.items():
        rows = {}
        for step in ways["alone"]:
            alone = statistics.median(us for us, _ in ways["alone"][step])
            own = statistics.median(us for us, _ in ways["pipelined"][step])
            commands = statistics.median(n for _, n in ways["alone"][step])
            rows[step] = {"alone_us": alone, "pipelined_us": own, "commands": commands}
        report["kinds"][kind] = rows
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--baseline", help="also gridqueue's steps as this git revision ran them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.jobs < 10 or args.rounds < 1:
        parser.error("--jobs must be at least 10 and --rounds at least 1")
    report = measure(args.jobs, args.rounds, args.baseline)
    print(
        f"Redis CPU per job by step (INFO cpu), median of {args.rounds} rounds of "
        f"{args.jobs} jobs; 'own work': pipelined, 'round trip': alone less pipelined"
    )
    print(f"  {'':36}{'commands':>9}{'own work':>11}{'round trip':>12}{'alone':>9}")
    totals = {}
    for kind, rows in report["kinds"].items():
        total = {"commands": 0.0, "pipelined_us": 0.0, "alone_us": 0.0}
        for step, row in rows.items():
            for key in total:
                total[key] += row[key]
            print(
                f"  {kind + ': ' + step:36}{row['commands']:9.1f}{row['pipelined_us']:8.1f} µs"
                f"{row['alone_us'] - row['pipelined_us']:9.1f} µs{row['alone_us']:6.1f} µs"
            )
        totals[kind] = total
        print(
            f"  {kind + ', one job':36}{total['commands']:9.1f}{total['pipelined_us']:8.1f} µs"
            f"{total['alone_us'] - total['pipelined_us']:9.1f} µs{total['alone_us']:6.1f} µs"
        )
    ours, bare = totals["gridqueue"], totals["bare Celery"]
    trips = (ours["alone_us"] - ours["pipelined_us"]) / (bare["alone_us"] - bare["pipelined_us"])
    print(
        f"gridqueue / bare Celery: {ours['alone_us'] / bare['alone_us']:.2f}x the CPU, of which "
        f"own work {ours['pipelined_us'] / bare['pipelined_us']:.2f}x and round trips {trips:.2f}x"
    )
    if args.baseline:
        label = f"gridqueue at {args.baseline}"
        then, then_rows = totals[label], report["kinds"][label]
        by_step = ", ".join(
            f"{step} {row['pipelined_us'] / then_rows[step]['pipelined_us']:.3f}x"
            for step, row in report["kinds"]["gridqueue"].items()
        )
        print(
            f"gridqueue now / at {args.baseline}: own work "
            f"{ours['pipelined_us'] / then['pipelined_us']:.3f}x, alone "
            f"{ours['alone_us'] / then['alone_us']:.3f}x; own work by step: {by_step}"
        )
    report["totals"] = totals
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
