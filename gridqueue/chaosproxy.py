"""A small TCP proxy that can cut a process off from Redis, without touching the network.

The drill's ``partition`` fault and the chaos tests run a worker behind one. Clients
connect to the proxy's port; it relays to the target. A partition comes in two kinds,
which Redis tells apart as a real network would make it:

- ``partition()`` (silent): packets are lost. Every relayed connection stays open at both
  ends, but nothing crosses it any more, and a new connection is accepted and never
  answered. Redis still sees the client connected (its presence subscription too), so
  only the heartbeat's silence tells, and the worker fences itself first.
- ``partition(reset=True)``: the connections are closed (a middlebox that sends resets, a
  proxy that restarts), and new ones are closed at once. To Redis this is the look of a
  process death: the closed presence subscription declares the worker dead within a
  fraction of ``stale_after_s``.

``heal()`` lets traffic through again; connections that a silent partition stalled are
closed then (what they carried was lost), and clients connect anew.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._partitioned = False
        self._silent = False  # the partition loses packets instead of closing connections
        self._stalled: list[socket.socket] = []  # held open by a silent partition
        self._closed = False
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    @classmethod
    def for_url(cls, redis_url: str) -> TcpProxy:
        """A proxy in front of the Redis of ``redis_url`` (redis:// with a host and port)."""
        parts = urlsplit(redis_url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def proxied(self, redis_url: str) -> str:
        """``redis_url`` with its host and port replaced by the proxy's (credentials, the
        database and the query are kept)."""
        parts = urlsplit(redis_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def partition(self, reset: bool = False) -> None:
        """Cut the clients off: silently (packets lost, connections left open), or with
        ``reset`` by closing their connections."""
        with self._lock:
            self._partitioned = True
            self._silent = not reset
            if reset:
                self._close_all(self._connections)

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False
            self._silent = False
            # What a stalled connection carried is lost: it cannot resume mid-stream.
            self._close_all(self._connections + self._stalled)
            self._stalled.clear()

    def close(self) -> None:
        self._closed = True
        self.partition(reset=True)
        self.heal()
        self._listener.close()

    def _close_all(self, conns: list[socket.socket]) -> None:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        conns.clear()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._partitioned:
                    if self._silent:
                        self._stalled.append(client)  # accepted, never answered
                    else:
                        client.close()
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed or (self._partitioned and not self._silent):
                    self._close_all([client, upstream])  # cut off while we connected
                    continue
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                if self._partitioned and self._silent:
                    continue  # lost on the way; the connection stays up at both ends
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
