"""`compilers serve` under hostile and heavy traffic (issue 19, items 1-5): a real `compilers serve` process on
a loopback port, under a 256 open-file limit, with short timeouts. Huge bodies are refused from their headers
without swelling memory or stalling the loop, large answers do not stall it, idle and half-sent connections are
closed and never crowd out clients, and a client that leaves mid-body is one log line. Every load is bounded in
requests and seconds."""
from __future__ import annotations

import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compilers
from compilers.serve.limits import JSON_BYTES_PER_ELEMENT, Limits, connection_cap, request_bytes
from compilers.serve.repository import publish
from compilers.serve.server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from probe import MB, Watch, post  # noqa: E402

NOFILE = 256                     # the server's open-file limit: its default connection cap is 192
WIDE = 100_000                   # the wide model's output columns: 8 rows answer 800k numbers


@pytest.fixture(scope="module")
def server(mlp, tmp_path_factory):
    """`compilers serve` on a free port in its own process (its memory and event loop are its own), with the
    MLP and a model whose answers are wide; yields (port, pid, log path)."""
    root = tmp_path_factory.mktemp("limits")
    mlp.save(root / "mlp")
    publish(root / "mlp", root / "repo" / "mlp")
    torch.manual_seed(0)
    wide = compilers.compile(nn.Linear(6, WIDE).eval(), "ort-cpu", (torch.randn(2, 6),))
    wide.save(root / "wide")
    publish(root / "wide", root / "repo" / "wide")
    port, log = free_port(), root / "server.log"

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "compilers.cli", "serve", str(root / "repo"), "--port",
                                 str(port), "--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "2"],
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_nofile,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while get(port, "/v2/health/ready")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield port, proc.pid, log
    finally:
        proc.terminate()
        proc.wait(60)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    except OSError:
        return 0, b""


def flood_body(rows: int) -> bytes:
    """An infer request for the MLP ([rows, 6] FP32) as JSON: 8 bytes per number."""
    return (b'{"inputs":[{"name":"input","shape":[%d,6],"datatype":"FP32","data":[' % rows +
            b"0.12345," * (rows * 6 - 1) + b'0.12345]}]}')


def test_the_request_limit_of_a_model_follows_its_max_batch_size(mlp):
    """What a request for the MLP can take (8 rows of 6 numbers) is known before its body is read."""
    assert request_bytes(mlp.signature, 8) == 64 * 1024 + 8 * 6 * JSON_BYTES_PER_ELEMENT
    assert request_bytes(mlp.signature, 1) < request_bytes(mlp.signature, 8)
    assert 8 <= connection_cap() < resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with pytest.raises(ValueError, match="max_bodies_bytes"):
        Limits(max_body_bytes=10 * MB, max_bodies_bytes=MB)


def test_a_flood_of_huge_bodies_is_refused_from_the_headers_and_never_stalls_the_server(server, mlp):
    """Four 56 MB JSON bodies at once (a batch far over max_batch_size): each gets its 400 without being
    parsed, the server's memory does not grow by even one body, and /v2/health/live keeps answering at once."""
    port, pid, _ = server
    body = flood_body(56 * MB // 48)
    assert len(body) > 55 * MB
    answers: list[tuple[int, bytes]] = []
    with Watch(port, pid) as watch:
        started = time.monotonic()
        threads = [threading.Thread(target=lambda: answers.append(post(port, "/v2/models/mlp/infer", body)))
                   for _ in range(4)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        took = time.monotonic() - started
    assert len(answers) == 4
    for status, content in answers:
        assert status == 400 and "the most a request for model 'mlp' can take" in json.loads(content)["error"]
    assert watch.pings >= 3 and watch.slowest < 0.25, (watch.slowest, watch.pings)
    assert watch.growth < 2 * Limits().max_body_bytes, watch.growth / MB
    assert took < 30, took
    x = np.random.default_rng(0).standard_normal((2, 6), dtype=np.float32)
    status, content = post(port, "/v2/models/mlp/infer", json.dumps(
        {"inputs": [{"name": "input", "shape": [2, 6], "datatype": "FP32", "data": x.ravel().tolist()}]}).encode())
    assert status == 200
    np.testing.assert_allclose(json.loads(content)["outputs"][0]["data"], mlp(x).ravel(), rtol=1e-6, atol=1e-6)


def test_large_json_answers_do_not_stall_the_server(server):
    """Requests of 8 rows whose JSON answers hold 800k numbers each: the answers are right and the event loop
    keeps answering /v2/health/live meanwhile."""
    port, pid, _ = server
    x = np.random.default_rng(1).standard_normal((8, 6), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [8, 6], "datatype": "FP32", "data": x.ravel().tolist()}]})
    answers: list[tuple[int, bytes]] = []
    with Watch(port, pid) as watch:
        threads = [threading.Thread(target=lambda: answers.extend(post(port, "/v2/models/wide/infer", body.encode())
                                                                  for _ in range(2))) for _ in range(3)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    assert len(answers) == 6 and all(status == 200 for status, _ in answers)
    first = json.loads(answers[0][1])["outputs"][0]
    assert first["shape"] == [8, WIDE] and len(first["data"]) == 8 * WIDE
    assert all(content == answers[0][1] for _, content in answers)
    assert watch.slowest < 0.25, watch.slowest


def test_large_repository_requests_are_refused_from_their_headers(server):
    """The repository API takes small JSON objects: a 20 MB one is refused unread, and the loop never parses it."""
    port, pid, _ = server
    body = b'{"ready": false, "pad": [' + b"0," * (10 * MB) + b"0]}"
    with Watch(port, pid) as watch:
        status, content = post(port, "/v2/repository/index", body)
    assert status == 400 and "the most the repository API takes" in json.loads(content)["error"]
    assert watch.slowest < 0.25, watch.slowest
    status, content = post(port, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and {row["name"] for row in json.loads(content)} == {"mlp", "wide"}


def half_sent(port: int, text: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(text)
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (whatever it says first)."""
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_idle_and_half_sent_connections_are_closed_and_never_crowd_out_clients(server):
    """300 half-sent requests against a server with 256 open files (1,100 under 1024 exhausted it): clients
    that send whole requests are served throughout; the half-sent and stalled ones are closed in seconds."""
    port, _, log = server
    stalled = [half_sent(port, b"GET /v2/health/live HT") for _ in range(300)]
    stalled += [half_sent(port, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{\"in")
                for _ in range(20)]
    try:
        for _ in range(20):                               # new clients, while the stalled ones hold the cap
            assert get(port, "/v2/health/live") == (200, b'{"live":true}')
        started = time.monotonic()
        closed = [closed_by_server(s, 5.0) for s in stalled[-60:]]   # the newest: not evicted, timed out
        assert all(closed) and time.monotonic() - started < 6
        assert get(port, "/v2/health/ready")[0] == 200
    finally:
        for s in stalled:
            s.close()
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def test_a_client_that_leaves_mid_body_is_one_log_line(server):
    port, _, log = server
    before = log.read_text()
    s = half_sent(port, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 800\r\n\r\n" + b"[" * 100)
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 10
    while "disconnected during its request body" not in log.read_text()[len(before):]:
        assert time.monotonic() < deadline, log.read_text()[len(before):]
        time.sleep(0.1)
    new = log.read_text()[len(before):]
    assert new.count("\n") <= 2 and "Traceback" not in new and "ClientDisconnect" not in new, new
    assert "INFO" in new and "127.0.0.1:" in new


def test_the_body_budget_takes_turns_and_refuses_after_its_wait():
    """Bodies beyond the room wait in arrival order, get it when it frees, and get Busy (503) after the wait;
    a waiter that gives up or is cancelled leaves the room as it was."""
    import asyncio

    from compilers.serve.limits import BodyBudget, Busy

    async def scenario() -> list[str]:
        budget, order = BodyBudget(100, wait=0.3), []

        async def request(name: str, size: int, hold: float) -> None:
            try:
                async with budget.hold(size):
                    order.append(f"{name} in")
                    await asyncio.sleep(hold)
            except Busy:
                order.append(f"{name} busy")
        first = asyncio.create_task(request("a", 80, 0.1))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(request("b", 50, 0.0)), asyncio.create_task(request("c", 10, 0.0))]
        await asyncio.gather(first, *waiting)                 # c fits at once but waits behind b: arrival order
        assert budget.free == 100
        async with budget.hold(100):
            late = asyncio.create_task(request("d", 1, 0.0))
            await asyncio.sleep(0.5)                          # longer than the wait: d gives up
            cancelled = asyncio.create_task(request("e", 1, 0.0))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            await asyncio.gather(late, cancelled, return_exceptions=True)
        assert budget.free == 100 and not budget._waiting
        async with budget.hold(10 ** 9):                      # more than the room: the whole room
            assert budget.free == 0
        return order
    assert asyncio.run(scenario()) == ["a in", "b in", "c in", "d busy"]
