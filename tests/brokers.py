"""The brokers the integration tests run on: the ledger's Redis, and RabbitMQ.

RabbitMQ cases use the server at ``GRIDQUEUE_TEST_AMQP_URL`` (default
``amqp://guest:guest@127.0.0.1:5672//``) under a private vhost made for this test session
with ``rabbitmqctl`` and deleted afterwards; no other vhost is touched. Where no RabbitMQ
answers, those cases skip and say how to run them; with ``GRIDQUEUE_TEST_REQUIRE_AMQP=1``
(set by ``.ci/run`` when something listens on 5672) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import kombu
import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
AMQP_URL_ENV = "GRIDQUEUE_TEST_AMQP_URL"
REQUIRE_AMQP_ENV = "GRIDQUEUE_TEST_REQUIRE_AMQP"
HOW_TO_RUN = (
    "start RabbitMQ (apt-get install rabbitmq-server; rabbitmq-server -detached) on "
    f"127.0.0.1:5672 or point {AMQP_URL_ENV} at one, with rabbitmqctl on PATH (it makes "
    "this session's private vhost)"
)
BROKERS = ["redis", "amqp"]


def _unavailable(why: str) -> None:
    if os.environ.get(REQUIRE_AMQP_ENV) == "1":
        pytest.fail(f"RabbitMQ cases cannot run ({why}), but {REQUIRE_AMQP_ENV}=1")
    pytest.skip(f"RabbitMQ cases skipped: {why}; to run them, {HOW_TO_RUN}")


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class AmqpVhost:
    """A private vhost on the test RabbitMQ."""

    name: str
    url: str
    known: set[str] = field(default_factory=set)  # every queue listed here so far

    def queues(self) -> list[str]:
        listed = _rabbitmqctl("list_queues", "-p", self.name, "name", "-q", "--no-table-headers")
        names = [line.strip() for line in listed.stdout.splitlines() if line.strip()]
        self.known.update(names)
        return names

    def purge_queues(self, names: list[str] | None = None) -> None:
        """Empty the vhost's queues between tests (the Redis cases flush their server):
        ``names``, or every queue ``rabbitmqctl`` lists (a second or so: it starts an
        Erlang VM). Purged, not deleted: a producer caches the queues it declared, and a
        message published to an exchange whose queue was deleted is routed nowhere."""
        names = self.queues() if names is None else names
        if not names:
            return
        k: Any = kombu
        with k.Connection(self.url, connect_timeout=5) as connection:
            for name in names:
                # a channel per queue: a refused purge (another client's exclusive queue)
                # closes its channel
                with contextlib.suppress(Exception), connection.channel() as channel:
                    channel.queue_purge(name)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[AmqpVhost]:
    base = os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
    k: Any = kombu
    try:
        with k.Connection(base, connect_timeout=3) as connection:
            connection.connect()
    except Exception as exc:  # refused, unreachable, bad login alike
        _unavailable(f"no RabbitMQ answered at {base.rpartition('@')[2]} ({exc})")
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not on PATH")
    name = f"gridqueue-test-{uuid.uuid4().hex[:10]}"
    parts = urlsplit(base)
    user = unquote(parts.username or "guest")
    created = _rabbitmqctl("add_vhost", name)
    if created.returncode != 0:
        _unavailable(f"rabbitmqctl add_vhost failed: {created.stderr.strip()}")
    try:
        allowed = _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        if allowed.returncode != 0:
            _unavailable(f"rabbitmqctl set_permissions failed: {allowed.stderr.strip()}")
        url = urlunsplit(parts._replace(path="/" + quote(name, safe="")))
        yield AmqpVhost(name, url)
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``None`` (the ledger's Redis carries the messages) or a RabbitMQ URL."""
    if request.param == "redis":
        yield None
        return
    vhost: AmqpVhost = request.getfixturevalue("amqp_vhost")
    # The last test's queues were listed and purged when it ended; purged again by name,
    # they lose anything handed back late (a closed consumer's unacked messages), and
    # every queue made since is listed, and purged, when this test ends.
    vhost.purge_queues(sorted(vhost.known))
    yield vhost.url
    vhost.purge_queues()


def unacked_messages(broker_url: str, queue: str) -> int:
    """Messages of ``queue`` delivered to a consumer and not yet acked, in the vhost of
    ``broker_url`` on the test RabbitMQ (``rabbitmqctl``: a second or so a call)."""
    vhost = unquote(urlsplit(broker_url).path[1:])
    listed = _rabbitmqctl(
        "list_queues", "-p", vhost, "name", "messages_unacknowledged", "-q", "--no-table-headers"
    )
    for line in listed.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == queue:
            return int(fields[1])
    raise AssertionError(f"no queue {queue} in vhost {vhost}: {listed.stderr.strip()}")


def broker_env(broker_url: str | None) -> dict[str, str]:
    """The environment that points a gridqueue process at this broker."""
    return {} if broker_url is None else {"GRIDQUEUE_BROKER_URL": broker_url}


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (name, ports, data and log directories in ``base``), so a
    test can kill -9 and restart a broker without touching the machine's shared one.
    ``rabbitmq-server`` drops to the ``rabbitmq`` user when started as root, so ``base``
    is handed to that user."""

    def __init__(self, base: Path, management: bool = False) -> None:
        from gridqueue.embedded import free_port

        self.base = base
        self.port = free_port()
        self.dist_port = free_port()
        # the management plugin and its HTTP API on a port of its own, or none
        self.management_port = free_port() if management else None
        self.node = f"gqtest{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.pid_file = base / "node.pid"
        self.process: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        for folder in ("mnesia", "log"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        plugins = "[]."
        if self.management_port is not None:
            conf += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            plugins = "[rabbitmq_management]."
        (self.base / "rabbitmq.conf").write_text(conf)
        (self.base / "enabled_plugins").write_text(plugins + "\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)
            self.base.chmod(0o755)

    def start(self, timeout_s: float = 60.0) -> None:
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }
        with open(self.base / "server.out", "ab") as out:
            self.process = subprocess.Popen(
                ["rabbitmq-server"], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.answers() and (self.management_port is None or self.management_answers()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"private RabbitMQ did not start: see {self.base / 'server.out'}")

    def answers(self) -> bool:
        k: Any = kombu
        try:
            with k.Connection(self.url, connect_timeout=1) as connection:
                connection.connect()
        except Exception:  # refused: nothing listens
            return False
        return True

    @property
    def management_url(self) -> str:
        assert self.management_port is not None, "started without the management plugin"
        return f"http://guest:guest@127.0.0.1:{self.management_port}"

    def management_answers(self) -> bool:
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.management_port}/api/overview",
            headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="},  # guest:guest
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def beam_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, not a shutdown."""
        pid = self.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
