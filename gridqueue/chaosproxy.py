"""A small TCP proxy that can cut a process off from Redis, without touching the network.

The drill's ``partition`` fault and the chaos tests run a worker behind one. Clients
connect to the proxy's port; it relays to the target. ``partition()`` closes every relayed
connection and refuses new ones (connect succeeds, then the socket is closed at once), as
a network partition looks to a client; ``heal()`` lets traffic through again.
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

    def partition(self) -> None:
        with self._lock:
            self._partitioned = True
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False

    def close(self) -> None:
        self._closed = True
        self.partition()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._partitioned:
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
