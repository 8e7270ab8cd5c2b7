"""Configuration: workload classes from TOML, Settings from GRIDQUEUE_* variables, and the
key layout that Python and the Lua scripts must agree on."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gridqueue import keys
from gridqueue.errors import ConfigError
from gridqueue.keys import Keys, lua_prelude
from gridqueue.settings import Settings
from gridqueue.workloads import DEFAULT_WORKLOADS_FILE, load_workloads, parse_workloads


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the process environment: start every test from none of ours."""
    for name in list(os.environ):
        if name.upper().startswith("GRIDQUEUE_"):
            monkeypatch.delenv(name)


def parse(text: str) -> dict[str, Any]:
    return parse_workloads(tomllib.loads(text), "test.toml")


VALID = "idempotent = true\nmax_attempts = 3\n"


# -- workload classes -------------------------------------------------------------------


def test_the_shipped_file_parses() -> None:
    classes = load_workloads(DEFAULT_WORKLOADS_FILE)
    assert {"realtime", "batch", "exclusive"} <= set(classes)
    assert all(name == workload.name for name, workload in classes.items())


def test_a_minimal_class_takes_the_documented_defaults() -> None:
    workload = parse(f"[gpu-heavy]\n{VALID}")["gpu-heavy"]
    assert (workload.idempotent, workload.max_attempts) == (True, 3)
    assert (workload.backoff_max_s, workload.poison_after_workers) == (0.0, 3)
    assert workload.default_deadline_s is None


def test_an_unknown_key_is_named_with_its_class_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[gpu-heavy]\n{VALID}max_attemps = 4\n")
    message = str(caught.value)
    assert "test.toml" in message and "[gpu-heavy]" in message
    assert "max_attemps" in message
    assert "max_attempts" in message.split("allowed", 1)[1]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_attempts": "0"}, "max_attempts"),
        ({"backoff_initial_s": "-1.0"}, "backoff_initial_s"),
        ({"backoff_initial_s": "5.0", "backoff_max_s": "1.0"}, "backoff_max_s"),
        ({"backoff_jitter_s": "-0.1"}, "backoff_jitter_s"),
        ({"backoff_multiplier": "0.5"}, "backoff_multiplier"),
        ({"default_deadline_s": "0.0"}, "default_deadline_s"),
        ({"poison_after_workers": "0"}, "poison_after_workers"),
        ({"priority": "10"}, "priority"),
        ({"requeue_priority": "-1"}, "requeue_priority"),
    ],
)
def test_a_bad_value_names_the_class_and_the_setting(settings: dict[str, str], named: str) -> None:
    table = {"idempotent": "true", "max_attempts": "3", **settings}
    lines = "".join(f"{key} = {value}\n" for key, value in table.items())
    with pytest.raises(ConfigError) as caught:
        parse(f"[gpu-heavy]\n{lines}")
    assert "'gpu-heavy'" in str(caught.value)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    "table",
    [
        "max_attempts = 3",  # idempotent is required: no silent default for a safety switch
        'idempotent = true\nmax_attempts = "3"',
    ],
)
def test_a_missing_or_mistyped_value_names_the_class(table: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("[gpu-heavy]")):
        parse(f"[gpu-heavy]\n{table}\n")


def test_a_string_where_a_boolean_belongs_is_refused() -> None:
    # "false" is truthy: accepted, it would retry non-idempotent work after a lost node.
    with pytest.raises(ConfigError, match=r"gpu-heavy.*idempotent must be true or false"):
        parse('[gpu-heavy]\nidempotent = "false"\nmax_attempts = 1\n')


def test_a_boolean_where_a_number_belongs_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_attempts must be an integer"):
        parse("[gpu-heavy]\nidempotent = true\nmax_attempts = true\n")


def test_a_value_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("[realtime] must be a table")):
        parse_workloads({"realtime": 3}, "test.toml")


def test_a_file_without_classes_is_refused() -> None:
    with pytest.raises(ConfigError, match="defines no workload class"):
        parse("")


def test_a_missing_file_says_which_setting_points_at_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GRIDQUEUE_WORKLOADS_FILE"):
        load_workloads(tmp_path / "nowhere.toml")


def test_a_broken_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "workloads.toml"
    path.write_text("[realtime\nidempotent = true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_workloads(path)
    assert str(path) in str(caught.value)


# -- Settings ---------------------------------------------------------------------------


def test_the_defaults_are_coherent() -> None:
    settings = Settings()
    assert settings.stale_after_s >= 2 * settings.heartbeat_interval_s
    assert settings.namespace == "gq"


def test_a_worker_may_not_be_declared_dead_after_one_late_heartbeat() -> None:
    with pytest.raises(ValidationError, match="GRIDQUEUE_STALE_AFTER_S must be at least twice"):
        Settings(heartbeat_interval_s=0.5, stale_after_s=0.99)
    assert Settings(heartbeat_interval_s=0.5, stale_after_s=1.0).stale_after_s == 1.0


def test_the_leader_lease_must_outlast_two_ticks() -> None:
    with pytest.raises(ValidationError, match="GRIDQUEUE_WATCHDOG_LEASE_S"):
        Settings(watchdog_tick_s=1.0, watchdog_lease_s=2.0)


@pytest.mark.parametrize(
    "field",
    [
        {"heartbeat_interval_s": 0},
        {"stale_after_s": -1},
        {"payload_max_bytes": 0},
        {"namespace": "a:b"},  # ':' separates the parts of every key
        {"namespace": ""},
        {"log_format": "xml"},
    ],
)
def test_bad_values_are_refused(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**field)


def test_settings_are_read_from_gridqueue_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    workloads = tmp_path / "classes.toml"
    monkeypatch.setenv("GRIDQUEUE_REDIS_URL", "redis://ledger.internal:6380/2")
    monkeypatch.setenv("GRIDQUEUE_NAMESPACE", "tenant-a")
    monkeypatch.setenv("GRIDQUEUE_HEARTBEAT_INTERVAL_S", "0.5")
    monkeypatch.setenv("GRIDQUEUE_STALE_AFTER_S", "3")
    monkeypatch.setenv("GRIDQUEUE_PAYLOAD_MAX_BYTES", "2048")
    monkeypatch.setenv("GRIDQUEUE_WORKLOADS_FILE", str(workloads))
    monkeypatch.setenv("GRIDQUEUE_LOG_FORMAT", "console")
    settings = Settings()
    assert settings.redis_url == "redis://ledger.internal:6380/2"
    assert settings.namespace == "tenant-a"
    assert (settings.heartbeat_interval_s, settings.stale_after_s) == (0.5, 3.0)
    assert settings.payload_max_bytes == 2048
    assert settings.workloads_file == workloads
    assert settings.log_format == "console"


def test_incoherent_variables_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQUEUE_HEARTBEAT_INTERVAL_S", "1")
    monkeypatch.setenv("GRIDQUEUE_STALE_AFTER_S", "1.5")
    with pytest.raises(ValidationError, match="GRIDQUEUE_HEARTBEAT_INTERVAL_S"):
        Settings()


def test_an_unparsable_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQUEUE_STALE_AFTER_S", "one second")
    with pytest.raises(ValidationError, match="stale_after_s"):
        Settings()


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDQUEUE_NAMESPACE", "from-env")
    assert Settings(namespace="explicit").namespace == "explicit"


# -- the key layout, as Python and as Lua -----------------------------------------------

LUA_CONSTANT = re.compile(r"^local (KOMBU_UNACKED(?:_INDEX)?) = '([^'\\]*)'$")
LUA_KEY_FUNCTION = re.compile(r"^local function key_(\w+)\(([\w, ]*)\) return (.+) end$")
LUA_TOKEN = r"(?:'[^'\\]*'|[A-Za-z_]\w*)"
LUA_CONCATENATION = re.compile(rf"^{LUA_TOKEN}(?:\s*\.\.\s*{LUA_TOKEN})*$")


def lua_functions() -> dict[str, tuple[list[str], str]]:
    """name -> (parameters, body expression) of every key_* function in the prelude."""
    found: dict[str, tuple[list[str], str]] = {}
    for line in lua_prelude().splitlines():
        if LUA_CONSTANT.match(line):
            continue
        match = LUA_KEY_FUNCTION.match(line)
        assert match, f"unexpected prelude line: {line!r}"
        name, params, body = match.groups()
        assert name not in found, f"key_{name} is defined twice"
        found[name] = ([p.strip() for p in params.split(",")], body)
    return found


def evaluate_lua(body: str, bindings: dict[str, str]) -> str:
    """Evaluate a Lua concatenation of single-quoted literals and parameters.

    Literals with escapes are refused: Python's repr and Lua do not escape alike.
    """
    assert LUA_CONCATENATION.match(body), f"not a plain concatenation: {body!r}"
    parts = re.findall(LUA_TOKEN, body)
    return "".join(part[1:-1] if part.startswith("'") else bindings[part] for part in parts)


def keys_members() -> set[str]:
    return {name for name in vars(Keys) if not name.startswith("_")}


def test_every_key_has_one_lua_function_and_back() -> None:
    assert set(lua_functions()) == keys_members()


@pytest.mark.parametrize("namespace", ["gq", "tenant-7.eu_west"])
def test_the_lua_prelude_renders_the_same_key_names_as_keys(namespace: str) -> None:
    python_keys = Keys(namespace)
    for name, (params, body) in lua_functions().items():
        assert params[0] == "ns"
        args = [f"{param}-value.{index}" for index, param in enumerate(params[1:])]
        lua_name = evaluate_lua(body, {"ns": namespace, **dict(zip(params[1:], args, strict=True))})
        member = getattr(python_keys, name)
        python_name = member(*args) if callable(member) else member
        assert lua_name == python_name, name
        assert lua_name.startswith(f"{namespace}:")


def test_the_prelude_names_kombus_structures_as_keys_does() -> None:
    constants = dict(
        match.groups() for line in lua_prelude().splitlines() if (match := LUA_CONSTANT.match(line))
    )
    assert constants == {
        "KOMBU_UNACKED": keys.KOMBU_UNACKED,
        "KOMBU_UNACKED_INDEX": keys.KOMBU_UNACKED_INDEX,
    }


def test_the_scripts_use_only_keys_the_prelude_defines() -> None:
    defined = set(lua_functions())
    scripts = [
        entry for entry in resources.files("gridqueue.lua").iterdir() if entry.name.endswith(".lua")
    ]
    assert len(scripts) > 5
    for script in scripts:
        used = set(re.findall(r"\bkey_(\w+)\(", script.read_text(encoding="utf-8")))
        assert used <= defined, f"{script.name} uses undefined keys {sorted(used - defined)}"
