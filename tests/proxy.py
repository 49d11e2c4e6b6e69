"""A small TCP proxy between a client and a real Redis, for partitions and latency in tests."""

from __future__ import annotations

import socket
import threading
import time


class Proxy:
    """Forwards 127.0.0.1:<port> to an upstream port; can cut, heal, and delay every chunk."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.latency = 0.0
        self._cut = False
        self._holding = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        """Drop every connection and refuse new ones (the partition)."""
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, []
        for c in conns:
            _close(c)

    def hold(self) -> None:
        """From now on, what clients send never reaches Redis, while replies already on their way still
        come back: a partition that begins between one command and the next on a connection."""
        self._holding = True

    def heal(self) -> None:
        with self._lock:
            self._cut = False
            self._holding = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._server)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_redis: bool = False) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_redis and self._holding:
                    continue  # never delivered (see hold)
                if self.latency:
                    time.sleep(self.latency)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
