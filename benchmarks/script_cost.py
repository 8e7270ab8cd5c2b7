"""Redis CPU per call of the heartbeat script, and of the prelude it carries.

Every ledger script runs its prelude (the key helpers and the shared functions of
``_common.lua``) on each call, before its own body: the closures and tables it defines
are built again every time. This prices it on a private Redis, from ``INFO
commandstats`` (``usec_per_call`` of EVALSHA, the server's own clock), with EVALSHA calls
sent in pipelines so that no round trip is counted:

- ``heartbeat``: ``heartbeat.lua`` as the ledger loads it, with the 8-GPU health
  document (about 1.7 kB of JSON) and without one (an empty string);
- ``prelude``: the heartbeat's prelude alone, then ``return 1``;
- ``bare``: ``return 1`` alone, the floor of an EVALSHA;
- the same heartbeat and prelude with the whole prelude (every helper, as every script
  carried it before the helpers were chosen by use), measured in the same run.

    python benchmarks/script_cost.py [--workers 1000] [--rounds 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.watchdog_scale import HEALTH  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import lua_prelude  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis  # noqa: E402
from gridqueue.lua import read_lua, script_source  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402


def _evalsha_stats(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def usec_per_call(
    ledger: Ledger, source: str, args_of: list[list[str | int]], rounds: int
) -> float:
    """EVALSHA ``source`` once per argument list, ``rounds`` times, in pipelines."""
    client = ledger.client
    script = client.register_script(source)
    script(keys=[], args=args_of[0])  # loaded, and its first call out of the count
    calls_before, usec_before = _evalsha_stats(client)
    for _ in range(rounds):
        pipe = client.pipeline(transaction=False)
        for args in args_of:
            script(keys=[], args=args, client=pipe)
        pipe.execute()
    calls, usec = _evalsha_stats(client)
    return (usec - usec_before) / max(1, calls - calls_before)


def measure(url: str, workers: int, rounds: int) -> dict[str, Any]:
    settings = Settings(redis_url=url)
    ledger = Ledger(connect_redis(url), settings)
    ledger.client.flushall()
    fit = json.dumps({"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}})
    pipe = ledger.client.pipeline(transaction=False)
    names = [f"node-{i}" for i in range(workers)]
    for name in names:
        ledger.queue_call(
            pipe, "register", name, "sim-llm", 1, "bench", 10, "{}", "simulated", "[]", fit,
            int(settings.stale_after_s * 1000),
        )  # fmt: skip
    epochs = [int(reply[0]) for reply in pipe.execute()]
    fixed = list(ledger.fixed_args)

    def beats(health: str) -> list[list[str | int]]:
        return [
            [*fixed, name, epoch, health, "HEALTHY", "", 0]
            for name, epoch in zip(names, epochs, strict=True)
        ]

    whole_prelude = lua_prelude() + read_lua("_common")
    heartbeat_body = read_lua("heartbeat")
    chosen_prelude = script_source("heartbeat")[: -len(heartbeat_body)]
    row: dict[str, Any] = {"workers": workers, "rounds": rounds}
    for label, prelude in (("whole", whole_prelude), ("chosen", chosen_prelude)):
        row[f"{label}_prelude_lines"] = prelude.count("\n")
        source = prelude + heartbeat_body
        row[f"{label}_heartbeat_health_us"] = usec_per_call(ledger, source, beats(HEALTH), rounds)
        row[f"{label}_heartbeat_us"] = usec_per_call(ledger, source, beats(""), rounds)
        row[f"{label}_prelude_us"] = usec_per_call(
            ledger, prelude + "return 1\n", beats(""), rounds
        )
    row["bare_us"] = usec_per_call(ledger, "return 1\n", beats(""), rounds)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with EmbeddedRedis() as url:
        row = measure(url, args.workers, args.rounds)
    print(
        f"EVALSHA, Redis CPU per call (INFO commandstats), {row['workers'] * row['rounds']} calls"
    )
    print(f"  bare 'return 1':                  {row['bare_us']:6.2f} us")
    for label, what in (("whole", "whole prelude"), ("chosen", "prelude chosen by use")):
        print(
            f"  {what} ({row[f'{label}_prelude_lines']} lines): alone "
            f"{row[f'{label}_prelude_us']:.2f} us, heartbeat {row[f'{label}_heartbeat_us']:.2f}"
            f" us, heartbeat with health {row[f'{label}_heartbeat_health_us']:.2f} us"
        )
    plain = row["chosen_heartbeat_us"] / row["whole_heartbeat_us"]
    health = row["chosen_heartbeat_health_us"] / row["whole_heartbeat_health_us"]
    print(f"  heartbeat, chosen / whole: {plain:.2f}x; with health {health:.2f}x")
    if args.json:
        print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
