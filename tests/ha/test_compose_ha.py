"""HA: what the docker-compose ``ha`` profile runs, checked without Docker.

The Sentinel config the profile mounts is run by a real ``redis-server --sentinel``
against a real primary (only its port and the primary's address are changed: the host
name becomes ``localhost``, so the hostname resolution the file turns on is exercised);
the env file the gridqueue services read gives settings that reach Redis through the
Sentinels; the compose file names the profile's services and mounts files that exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gridqueue.embedded import EmbeddedRedis, find_redis_server, free_port
from gridqueue.ledger import connect_redis
from gridqueue.settings import Settings
from tests.helpers import wait_for

pytestmark = pytest.mark.ha

ROOT = Path(__file__).resolve().parents[2]
SENTINEL_CONF = ROOT / "config" / "sentinel" / "sentinel.conf"
HA_ENV = ROOT / "config" / "gridqueue-ha.env"
COMPOSE = ROOT / "docker-compose.yml"


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def sentinel_from_the_compose_file(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, int]]:
    primary = EmbeddedRedis()
    primary.start()
    port = free_port()
    text = SENTINEL_CONF.read_text()
    assert "port 26379" in text and "redis-primary 6379" in text
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        text.replace("port 26379", f"port {port}").replace(
            "redis-primary 6379", f"localhost {primary.port}"
        )
    )
    log = tmp_path / "sentinel.log"
    process = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel", "--bind", "127.0.0.1",
         "--logfile", str(log)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        try:
            wait_for(lambda: _answers(client) or process.poll() is not None, timeout_s=15)
        finally:
            assert process.poll() is None, log.read_text() if log.exists() else "no log"
        yield primary, port
    finally:
        client.close()
        process.kill()
        process.wait(timeout=10)
        primary.cleanup()


def test_the_profiles_sentinel_conf_runs_and_watches_the_primary(
    sentinel_from_the_compose_file: tuple[EmbeddedRedis, int],
) -> None:
    primary, port = sentinel_from_the_compose_file
    with redis.Redis(host="127.0.0.1", port=port, decode_responses=True) as client:
        address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "gridqueue")
        assert int(address[1]) == primary.port
        master = client.execute_command("SENTINEL", "MASTER", "gridqueue")
        fields = dict(master)
        assert int(fields["down-after-milliseconds"]) == 5000
        assert int(fields["quorum"]) == 2
        # It talks to the primary it was given by name.
        wait_for(lambda: "s_down" not in dict(client.execute_command(
            "SENTINEL", "MASTER", "gridqueue"))["flags"], timeout_s=10)  # fmt: skip


def test_the_profiles_env_file_reaches_the_ledger_through_the_sentinels(
    sentinel_from_the_compose_file: tuple[EmbeddedRedis, int],
) -> None:
    primary, port = sentinel_from_the_compose_file
    values: dict[str, str] = {}
    for line in HA_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    assert values["GRIDQUEUE_REDIS_SENTINEL_MASTER"] == "gridqueue"
    assert values["GRIDQUEUE_REDIS_MIN_REPLICAS"] == "1"
    hosts = re.findall(r"sentinel://(sentinel-\d):26379", values["GRIDQUEUE_REDIS_URL"])
    assert hosts == ["sentinel-1", "sentinel-2", "sentinel-3"]
    # The compose host names become this test's one Sentinel.
    url = re.sub(r"sentinel-\d:26379", f"127.0.0.1:{port}", values["GRIDQUEUE_REDIS_URL"])
    settings = Settings(
        redis_url=url,
        redis_sentinel_master=values["GRIDQUEUE_REDIS_SENTINEL_MASTER"],
        redis_min_replicas=int(values["GRIDQUEUE_REDIS_MIN_REPLICAS"]),
        redis_replica_timeout_s=float(values["GRIDQUEUE_REDIS_REPLICA_TIMEOUT_S"]),
    )
    client = connect_redis(settings.redis_target)
    try:
        client.set("compose-ha-probe", "1")
    finally:
        client.close()
    with redis.Redis(host="127.0.0.1", port=primary.port) as direct:
        assert direct.get("compose-ha-probe") == b"1"


def _has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
    )
    return version.returncode == 0


def test_the_compose_file_has_the_ha_profile() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml")
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = compose["services"]
    ha = {name for name, s in services.items() if "ha" in (s.get("profiles") or [])}
    assert {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
            "rabbitmq", "watchdog-ha", "worker-ha-1", "worker-ha-2"} <= ha  # fmt: skip
    # The default fleet stays as it was: no profile on its services.
    assert "profiles" not in services["redis"] and "profiles" not in services["worker-1"]
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis-primary", "6379"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        mounts = [v.split(":")[0] for v in services[name]["volumes"]]
        assert "./config/sentinel/sentinel.conf" in mounts
        assert "--sentinel" in " ".join(services[name]["command"])
    for name in ("watchdog-ha", "worker-ha-1", "worker-ha-2"):
        assert services[name]["env_file"] == ["config/gridqueue-ha.env"]
        assert not services[name].get("environment")  # the env file is not overridden
    for path in ("config/sentinel/sentinel.conf", "config/gridqueue-ha.env"):
        assert (ROOT / path).is_file()
    for volume in ("redis-primary-data", "sentinel-1-data", "rabbitmq-data"):
        assert volume in compose["volumes"]
    if _has_docker_compose():  # where Docker Compose is, let it judge the file too
        done = subprocess.run(
            ["docker", "compose", "--profile", "ha", "config", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
