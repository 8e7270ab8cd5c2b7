"""Where the ledger lives: a Redis URL, or a Sentinel set that names the current primary.

Every gridqueue process reaches Redis through a :class:`RedisTarget`, built from the
settings. A plain ``redis://`` or ``rediss://`` URL is one server. kombu's Sentinel form,
``sentinel://HOST:PORT;sentinel://HOST:PORT/DB``, is a set of Sentinels that agree on
which server is the primary of the master named ``GRIDQUEUE_REDIS_SENTINEL_MASTER``:
the ledger (redis-py's ``Sentinel.master_for``), the broker (kombu's ``sentinel``
transport) and the dashboard's live stream (redis-py's asyncio Sentinel) each ask the
Sentinels for the primary whenever a connection is opened, so a promoted replica is
followed on the next reconnect, without a restart.

A password in the user info of the Sentinel URL is the primary's (``requirepass``); the
Sentinels' own password, when they have one, is ``GRIDQUEUE_REDIS_SENTINEL_PASSWORD``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


class RedisTargetError(ValueError):
    """The Redis URL or the Sentinel settings cannot name a server."""


@dataclass(frozen=True)
class SentinelSet:
    """The parts of a ``sentinel://`` URL."""

    hosts: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelSet:
    """``sentinel://[[user]:password@]HOST[:PORT][;sentinel://HOST[:PORT]]...[/DB]``: the
    Sentinels to ask, and the primary's database and credentials (from any part that has
    them, as kombu reads them)."""
    hosts: list[tuple[str, int]] = []
    db = 0
    username = password = None
    for part in url.split(";"):
        piece = urlsplit(part.strip())
        if piece.scheme != SENTINEL_SCHEME:
            raise RedisTargetError(
                f"every part of a Sentinel URL starts with sentinel://, got {part.strip()!r}"
            )
        if not piece.hostname:
            raise RedisTargetError(f"no host in Sentinel URL part {part.strip()!r}")
        try:
            port = piece.port or DEFAULT_SENTINEL_PORT
        except ValueError as exc:
            raise RedisTargetError(f"bad port in Sentinel URL part {part.strip()!r}") from exc
        hosts.append((piece.hostname, port))
        if piece.password is not None:
            username = unquote(piece.username) if piece.username else None
            password = unquote(piece.password)
        path = piece.path.strip("/")
        if path:
            if not path.isdigit():
                raise RedisTargetError(f"the database in a Sentinel URL is a number, got {path!r}")
            db = int(path)
    return SentinelSet(tuple(hosts), db, username, password)


@dataclass(frozen=True)
class RedisTarget:
    """One Redis server by URL, or the primary a Sentinel set names."""

    url: str
    sentinel_master: str | None = None
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if self.is_sentinel:
            parse_sentinel_url(self.url)  # fail now, with the reason, not at first use
            if not self.sentinel_master:
                raise RedisTargetError(
                    "a sentinel:// Redis URL needs the master's name: set "
                    "GRIDQUEUE_REDIS_SENTINEL_MASTER to the name in the Sentinels' "
                    "`sentinel monitor <name> ...` line"
                )
        elif self.sentinel_master:
            raise RedisTargetError(
                "GRIDQUEUE_REDIS_SENTINEL_MASTER is set but the Redis URL is not a "
                "sentinel:// URL; unset it, or list the Sentinels as "
                "sentinel://HOST:PORT;sentinel://HOST:PORT/DB"
            )

    @property
    def is_sentinel(self) -> bool:
        return self.url.lstrip().lower().startswith(f"{SENTINEL_SCHEME}://")

    def __str__(self) -> str:
        return self.url if not self.is_sentinel else f"{self.url} (master {self.sentinel_master})"

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client; ``options`` are redis-py's connection options."""
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **options)
        sentinels = parse_sentinel_url(self.url)
        manager = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels.hosts),
            sentinel_kwargs=self._sentinel_options(options),
            **options,
        )
        assert self.sentinel_master is not None
        master: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
            self.sentinel_master,
            db=sentinels.db,
            username=sentinels.username,
            password=sentinels.password,
        )
        return master

    def connection_pool(self, **options: Any) -> redis.ConnectionPool:
        """A pool of this target's connections, for code that drives connections by hand;
        a Sentinel pool's connections ask the Sentinels for the primary when they open."""
        if not self.is_sentinel:
            return redis.ConnectionPool.from_url(self.url, **options)
        return self.client(**options).connection_pool

    def async_client(self, **options: Any) -> aioredis.Redis:
        """The asyncio twin of :meth:`client`."""
        if not self.is_sentinel:
            return aioredis.Redis.from_url(self.url, **options)
        sentinels = parse_sentinel_url(self.url)
        manager = AsyncSentinel(  # type: ignore[no-untyped-call]
            list(sentinels.hosts),
            sentinel_kwargs=self._sentinel_options(options),
            **options,
        )
        assert self.sentinel_master is not None
        master: aioredis.Redis = manager.master_for(
            self.sentinel_master,
            db=sentinels.db,
            username=sentinels.username,
            password=sentinels.password,
        )
        return master

    def broker_options(self) -> dict[str, Any]:
        """kombu transport options this target needs (the master's name for Sentinel)."""
        if not self.is_sentinel:
            return {}
        options: dict[str, Any] = {"master_name": self.sentinel_master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options

    def _sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The Sentinels' connections: the same bounded socket waits, their own password."""
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        if self.sentinel_password:
            sentinel_options["password"] = self.sentinel_password
        return sentinel_options
