"""Client-side probes of a running server, shared by benchmarks/flood.py and tests/test_serve_limits.py: a POST
sent as a client that does not watch for an early answer, and `Watch`, which measures the event loop's longest
stall (the slowest /v2/health/live answer) and the server's peak RSS while a block runs."""
from __future__ import annotations

import http.client
import socket
import threading
import time

import psutil

MB = 1 << 20


def post(port: int, path: str, body: bytes | memoryview, head: dict[str, str] | None = None,
         timeout: float = 120) -> tuple[int, bytes]:
    """POST `body` to 127.0.0.1:`port`: the whole body, then read the answer (status, content)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        lines = [f"POST {path} HTTP/1.1", "Host: probe", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in (head or {}).items())]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for i in range(0, len(body), MB):
                s.sendall(body[i:i + MB])
        except (BrokenPipeError, ConnectionResetError):     # the server answered early and closed
            pass
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, r.read()


class Watch:
    """While the block runs: the slowest /v2/health/live answer (one kept-alive client, every 5 ms) and the
    peak RSS of the server's process (every 2 ms)."""

    def __init__(self, port: int, pid: int):
        self.port, self.process = port, psutil.Process(pid)
        self.slowest, self.peak, self.pings = 0.0, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "Watch":
        self.base = self.process.memory_info().rss
        self._threads = [threading.Thread(target=self._ping), threading.Thread(target=self._sample)]
        [t.start() for t in self._threads]
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        [t.join(30) for t in self._threads]

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def line(self) -> str:
        return (f"/v2/health/live: slowest {self.slowest * 1e3:.1f} ms over {self.pings} pings; server RSS "
                f"{self.base / MB:.0f} MB -> peak {self.peak / MB:.0f} MB (+{self.growth / MB:.0f} MB)")

    def _ping(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/v2/health/live")
            r = conn.getresponse()
            if r.status != 200 or not r.read():
                raise AssertionError(f"/v2/health/live answered {r.status}")
            self.slowest = max(self.slowest, time.perf_counter() - started)
            self.pings += 1
            time.sleep(0.005)
        conn.close()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)
