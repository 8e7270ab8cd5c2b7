"""A private Redis primary, its replicas and three Sentinels, for the HA tests and the
Sentinel failover benchmark.

Every server is a real ``redis-server`` (the same binary as :mod:`gridqueue.embedded`),
bound to 127.0.0.1 on free ports in one temporary directory; the Sentinels are
``redis-server --sentinel`` with a config file of their own, which they rewrite as the
topology changes. ``kill_primary()`` is a kill -9 of whichever server the Sentinels name
as primary now; ``restart(port)`` brings a killed server back on its port and directory,
and the Sentinels turn a returning old primary into a replica of the new one.

``replica_env`` gives the replicas environment variables of their own (the HA tests run a
replica under libfaketime, so that the promoted server's clock differs from the old
primary's); a restarted server keeps the environment it was first started with.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import redis

from gridqueue.embedded import find_redis_server, free_port
from gridqueue.errors import GridQueueError

MASTER_NAME = "gridqueue"


class EmbeddedSentinelSet:
    """``with EmbeddedSentinelSet() as ha:`` gives a primary, ``replicas`` replicas and
    ``sentinels`` Sentinels (quorum: a majority) on loopback ports."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        master_name: str = MASTER_NAME,
        binary: str | None = None,
        replica_env: Mapping[str, str] | None = None,
    ) -> None:
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.binary = binary or find_redis_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="gridqueue-sentinel-")
        self.dir = Path(self._tmp.name)
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.first_primary = self.data_ports[0]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        # Extra environment per data server, kept across restarts.
        self.server_env: dict[int, dict[str, str]] = {
            port: dict(replica_env or {}) for port in self.data_ports[1:]
        }

    # -- the URL every gridqueue process is given ---------------------------------------

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"

    def env(self, min_replicas: int = 0) -> dict[str, str]:
        """The GRIDQUEUE_* variables of a process that uses this set."""
        return {
            "GRIDQUEUE_REDIS_URL": self.url,
            "GRIDQUEUE_REDIS_SENTINEL_MASTER": self.master_name,
            "GRIDQUEUE_REDIS_MIN_REPLICAS": str(min_replicas),
        }

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> str:
        for port in self.data_ports:
            replica_of = None if port == self.first_primary else self.first_primary
            self._start_data(port, replica_of)
        for port in self.sentinel_ports:
            self._start_sentinel(port)
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            if self._replicas_in_sync(self.first_primary) >= len(self.data_ports) - 1 and all(
                self._sentinel_knows_all(port) for port in self.sentinel_ports
            ):
                return self.url
            time.sleep(0.1)
        self.cleanup()
        raise GridQueueError(f"the Sentinel set did not come up within {timeout_s} s")

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels name it now (None: no answer)."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                with self._client(port) as client:
                    address = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
            except redis.RedisError:
                continue
            if address:
                votes[int(address[1])] = votes.get(int(address[1]), 0) + 1
        for port, count in votes.items():
            if count > len(self.sentinel_ports) // 2:
                return port
        return None

    def kill_primary(self) -> int:
        """kill -9 the current primary; returns its port."""
        port = self.primary_port()
        if port is None:
            raise GridQueueError("the Sentinels name no primary")
        self.kill(port)
        return port

    def kill(self, port: int) -> None:
        process = self.processes.pop(port, None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def wait_promoted(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Wait until the Sentinels name another primary and it answers as one."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            port = self.primary_port()
            if port is not None and port != old_port and self._role(port) == "master":
                return port
            time.sleep(0.05)
        raise GridQueueError(f"no replica was promoted within {timeout_s} s")

    def restart(self, port: int, primary: int | None) -> None:
        """Bring a killed data server back as a replica of ``primary``, as an operator's
        restart would. ``primary=None`` is the careless restart: the server comes back
        empty and as a primary, until the Sentinels notice and convert it (the failover
        benchmark's ``--restart-as primary`` measures what that costs)."""
        if port == primary:
            raise ValueError("a restarted server comes back as a replica of another one")
        self._start_data(port, primary)

    def wait_replicas(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until the current primary has ``count`` replicas streaming from it."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            port = self.primary_port()
            if port is not None and self._replicas_in_sync(port) >= count:
                return
            time.sleep(0.1)
        raise GridQueueError(f"the primary has fewer than {count} replicas after {timeout_s} s")

    def cleanup(self) -> None:
        for port in list(self.processes):
            process = self.processes.pop(port)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self._tmp.cleanup()

    def __enter__(self) -> EmbeddedSentinelSet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals ----------------------------------------------------------------------

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=1.0,
            decode_responses=True,
        )  # fmt: skip

    def _start_data(self, port: int, replica_of: int | None) -> None:
        home = self.dir / f"redis-{port}"
        home.mkdir(exist_ok=True)
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(home),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(home / "redis.log"),
        ]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.processes[port] = self._spawn(args, self.server_env.get(port))
        self._wait_ping(port, home / "redis.log")

    def _start_sentinel(self, port: int) -> None:
        home = self.dir / f"sentinel-{port}"
        home.mkdir(exist_ok=True)
        quorum = len(self.sentinel_ports) // 2 + 1
        name = self.master_name
        (home / "sentinel.conf").write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {home}\n"
            f"logfile {home / 'sentinel.log'}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.first_primary} {quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.processes[port] = self._spawn([self.binary, str(home / "sentinel.conf"), "--sentinel"])
        self._wait_ping(port, home / "sentinel.log")

    def _spawn(
        self, args: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )

    def _wait_ping(self, port: int, log: Path, timeout_s: float = 10.0) -> None:
        give_up_at = time.monotonic() + timeout_s
        with self._client(port) as client:
            while time.monotonic() < give_up_at:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                process = self.processes[port]
                if process.poll() is not None:
                    break
                time.sleep(0.02)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise GridQueueError(f"redis-server on port {port} did not start:\n{tail}")

    def _role(self, port: int) -> str | None:
        try:
            with self._client(port) as client:
                return str(client.info("replication").get("role"))
        except redis.RedisError:
            return None

    def _replicas_in_sync(self, port: int) -> int:
        try:
            with self._client(port) as client:
                info = client.info("replication")
        except redis.RedisError:
            return 0
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )

    def _sentinel_knows_all(self, port: int) -> bool:
        """This Sentinel sees the replicas and the other Sentinels: a failover can start."""
        try:
            with self._client(port) as client:
                master = client.execute_command("SENTINEL", "MASTER", self.master_name)
        except redis.RedisError:
            return False
        fields = dict(master)  # redis-py parses the reply into a dict
        return (
            int(fields.get("num-slaves", 0)) >= len(self.data_ports) - 1
            and int(fields.get("num-other-sentinels", 0)) >= len(self.sentinel_ports) - 1
        )
