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
  carried it before the helpers were chosen by use), measured in the same run;
- ``function_heartbeat``: the heartbeat as a function of the ledger's library (FCALL, the
  path on Redis 7: the prelude is built at load, not per call), and ``bare_function``, a
  function that returns 1, the floor of an FCALL.

``--baseline REV`` adds the heartbeat as revision REV loaded it (its ``_common.lua`` and
``heartbeat.lua`` whole), for a before and after in one run.

    python benchmarks/script_cost.py [--workers 1000] [--rounds 30] [--baseline REV] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.watchdog_scale import HEALTH  # noqa: E402
from gridqueue.embedded import EmbeddedRedis  # noqa: E402
from gridqueue.keys import lua_prelude  # noqa: E402
from gridqueue.ledger import Ledger, connect_redis  # noqa: E402
from gridqueue.lua import ENTER, entry, prelude_for, read_lua, script_source  # noqa: E402
from gridqueue.settings import Settings  # noqa: E402

# A function library whose one function returns at once: the floor of an FCALL.
BARE_LIBRARY = (
    "#!lua name=script_cost_bare\n"
    "redis.register_function('script_cost_bare', function(keys, args) return 1 end)\n"
)
FUNCTION = "function:"  # a source that starts so names a function (FCALL), not a text


def _stats(client: Any, command: str) -> tuple[int, int]:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def usec_per_call(
    client: Any, sources: dict[str, tuple[str, list[list[str | int]]]], rounds: int
) -> dict[str, float]:
    """Each source called once per argument list, in one pipeline, round after round, the
    sources taking turns so that a noisy machine weighs on all alike: the median over the
    rounds of each one's usec per call. A source is a script's text (EVALSHA), or
    ``function:<name>``, a loaded function (FCALL)."""
    scripts = {
        label: client.register_script(source)
        for label, (source, _) in sources.items()
        if not source.startswith(FUNCTION)
    }

    def queue(pipe: Any, label: str, args: list[str | int]) -> None:
        source = sources[label][0]
        if label in scripts:
            scripts[label](keys=[], args=args, client=pipe)
        else:
            pipe.fcall(source.removeprefix(FUNCTION), 0, *args)

    per_round: dict[str, list[float]] = {label: [] for label in sources}
    for label, (_, args_of) in sources.items():
        pipe = client.pipeline(transaction=False)
        queue(pipe, label, args_of[0])  # loaded, and its first call out of the count
        pipe.execute()
    for _ in range(rounds):
        for label, (_, args_of) in sources.items():
            command = "evalsha" if label in scripts else "fcall"
            calls_before, usec_before = _stats(client, command)
            pipe = client.pipeline(transaction=False)
            for args in args_of:
                queue(pipe, label, args)
            pipe.execute()
            calls, usec = _stats(client, command)
            per_round[label].append((usec - usec_before) / max(1, calls - calls_before))
    return {label: statistics.median(values) for label, values in per_round.items()}


BASELINE_FUNCTION = "script_cost_baseline_heartbeat"


def _baseline_library(common: str, heartbeat: str, enter: str) -> str:
    """A library of one function: ``heartbeat`` on the prelude ``common``, entered by
    ``enter`` as the ledger's library enters its functions."""
    return (
        "#!lua name=script_cost_baseline\n"
        + lua_prelude()
        + common
        + f"local function heartbeat(KEYS, ARGV) {enter.strip()}\n{heartbeat}\nend\n"
        + f"redis.register_function('{BASELINE_FUNCTION}', heartbeat)\n"
    )


def _at(revision: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip


def measure(url: str, workers: int, rounds: int, baseline: str | None) -> dict[str, Any]:
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
    pairs = list(zip(names, epochs, strict=True))

    def beats(health: str) -> list[list[Any]]:
        return [
            ledger.argv("heartbeat", *ledger.heartbeat_args(name, epoch, health, "HEALTHY"))
            for name, epoch in pairs
        ]

    with_health, without = beats(HEALTH), beats("")
    body = read_lua("heartbeat")
    whole = lua_prelude() + read_lua("_common") + entry("heartbeat")
    chosen = script_source("heartbeat")[: -len(body)]
    ledger.client.function_load(BARE_LIBRARY, replace=True)
    ledger.client.function_load(ledger.scripts.library.text, replace=True)
    heartbeat_function = FUNCTION + ledger.scripts.library.functions["heartbeat"]
    sources = {
        "bare": ("return 1\n", without),
        "bare_function": (FUNCTION + "script_cost_bare", without),
        "function_heartbeat": (heartbeat_function, without),
        "function_heartbeat_health": (heartbeat_function, with_health),
        "whole_prelude": (whole + "return 1\n", without),
        "chosen_prelude": (chosen + "return 1\n", without),
        "whole_heartbeat": (whole + body, without),
        "whole_heartbeat_health": (whole + body, with_health),
        "heartbeat": (chosen + body, without),
        "heartbeat_health": (chosen + body, with_health),
    }
    if baseline:  # the heartbeat as that revision loaded it (the key helpers are today's)
        common = _at(baseline, "gridqueue/lua/_common.lua")
        then = _at(baseline, "gridqueue/lua/heartbeat.lua")
        then_enter = entry("heartbeat") if "function enter_beat(" in common else ENTER
        if then_enter == ENTER:  # before the heartbeat took two fixed arguments, not six
            fixed = list(ledger.fixed_args)
            then_with = [[*fixed, name, epoch, HEALTH, "HEALTHY", "", 0] for name, epoch in pairs]
            then_without = [[*fixed, name, epoch, "", "HEALTHY", "", 0] for name, epoch in pairs]
        else:
            then_with, then_without = with_health, without
        if "function enter(" in common:  # a revision of the function library
            # Its body after its own prelude and entry, as today's: EVALSHA, and FCALL from
            # a library of its own (on the same Redis, so the ratio is in-run).
            library = _baseline_library(common, then, then_enter)
            ledger.client.function_load(library, replace=True)
            sources["baseline_function_heartbeat"] = (FUNCTION + BASELINE_FUNCTION, then_without)
            sources["baseline_function_heartbeat_health"] = (
                FUNCTION + BASELINE_FUNCTION,
                then_with,
            )
            before = prelude_for(then_enter + then) + then_enter + then
        else:
            before = lua_prelude() + common + then
        sources["baseline_heartbeat"] = (before, then_without)
        sources["baseline_heartbeat_health"] = (before, then_with)
    row: dict[str, Any] = {"workers": workers, "rounds": rounds, "baseline": baseline}
    row["whole_prelude_lines"] = whole.count("\n")
    row["chosen_prelude_lines"] = chosen.count("\n")
    for label, usec in usec_per_call(ledger.client, sources, rounds).items():
        row[f"{label}_us"] = round(usec, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--baseline", help="also the heartbeat as this git revision had it")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with EmbeddedRedis() as url:
        row = measure(url, args.workers, args.rounds, args.baseline)
    print(
        f"EVALSHA, Redis CPU per call (INFO commandstats), median of {row['rounds']} rounds "
        f"of {row['workers']} calls each"
    )
    print(f"  bare 'return 1':           {row['bare_us']:6.2f} us")
    print(
        f"  prelude alone: whole ({row['whole_prelude_lines']} lines) "
        f"{row['whole_prelude_us']:.2f} us, the heartbeat's ({row['chosen_prelude_lines']} "
        f"lines) {row['chosen_prelude_us']:.2f} us"
    )
    print(
        f"  heartbeat, whole prelude:  {row['whole_heartbeat_us']:6.2f} us, with health "
        f"{row['whole_heartbeat_health_us']:.2f} us"
    )
    print(
        f"  heartbeat as loaded:       {row['heartbeat_us']:6.2f} us, with health "
        f"{row['heartbeat_health_us']:.2f} us"
    )
    print(
        f"FCALL: bare 'return 1' {row['bare_function_us']:.2f} us; the heartbeat as a "
        f"function of the library {row['function_heartbeat_us']:.2f} us, with health "
        f"{row['function_heartbeat_health_us']:.2f} us; function / EVALSHA as loaded "
        f"{row['function_heartbeat_us'] / row['heartbeat_us']:.2f}x"
    )
    if row["baseline"]:
        print(
            f"  heartbeat at {row['baseline']}: {row['baseline_heartbeat_us']:6.2f} us, with "
            f"health {row['baseline_heartbeat_health_us']:.2f} us; now / then "
            f"{row['heartbeat_us'] / row['baseline_heartbeat_us']:.2f}x, with health "
            f"{row['heartbeat_health_us'] / row['baseline_heartbeat_health_us']:.2f}x"
        )
        print(
            f"  the heartbeat function / at {row['baseline']}: "
            f"{row['function_heartbeat_us'] / row['baseline_heartbeat_us']:.2f}x, with health "
            f"{row['function_heartbeat_health_us'] / row['baseline_heartbeat_health_us']:.2f}x"
        )
    if "baseline_function_heartbeat_us" in row:
        now, then = (
            row["function_heartbeat_health_us"],
            row["baseline_function_heartbeat_health_us"],
        )
        print(
            f"  FCALL, the heartbeat at {row['baseline']}: "
            f"{row['baseline_function_heartbeat_us']:.2f} us, with health "
            f"{row['baseline_function_heartbeat_health_us']:.2f} us; now / then "
            f"{row['function_heartbeat_us'] / row['baseline_function_heartbeat_us']:.2f}x, "
            f"with health {now / then:.2f}x"
        )
    if args.json:
        print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
