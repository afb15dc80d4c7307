"""A fault-injecting TCP proxy on 127.0.0.1 in front of a real S3 server.

Each new client connection either passes through untouched or, while failures are armed, gets a
real transient failure: an HTTP 503 SlowDown reply (what S3 sends when throttling) or a TCP reset.
The proxy never looks inside passing traffic, so SigV4 signatures stay valid. Point a backend's
`endpoint_url` at `FaultProxy(port).endpoint` to test its retries (tests/test_s3_failures.py).
Standard library only.
"""
from __future__ import annotations

import socket
import struct
import threading

_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
         b"<Message>Please reduce your request rate.</Message></Error>")
SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_BODY)) + _BODY


class FaultProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._armed: list[str] = []
        self.always: str | None = None
        self._live: set[socket.socket] = set()
        self.injected: list[str] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, n: int, kind: str = "slowdown") -> None:
        """The next `n` connections fail with `kind` ("slowdown" or "reset")."""
        with self._lock:
            self._armed += [kind] * n

    def fail_always(self, kind: str = "slowdown") -> None:
        """Every connection fails from now on; pooled keep-alive connections are cut too."""
        with self._lock:
            self.always = kind
            live, self._live = list(self._live), set()
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                kind = self._armed.pop(0) if self._armed else self.always
                if kind:
                    self.injected.append(kind)
            target = self._fail if kind else self._pipe
            threading.Thread(target=target, args=(conn, kind), daemon=True).start()

    def _fail(self, conn: socket.socket, kind: str) -> None:
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                if kind == "reset":   # SO_LINGER 0: close() sends RST, a "connection reset by peer"
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(SLOWDOWN)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(1 << 20):   # drain the body so the client reads our reply, not a RST
                    pass
            except OSError:
                pass

    def _pipe(self, conn: socket.socket, _kind) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            conn.close()
            return
        with self._lock:
            self._live.add(conn)

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 20):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=copy, args=(upstream, conn), daemon=True).start()
        copy(conn, upstream)
        conn.close()
        upstream.close()
