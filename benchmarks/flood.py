"""`compilers serve` under hostile and heavy traffic (issue 19): the server in its own process, as a user runs
it, on the 64-wide MLP of examples/mlp.py (ort-cpu, max_batch_size 8) and a wide model (8 rows answer 800k
numbers); every load bounded in requests and seconds. While each load runs, one client asks /v2/health/live
every 5 ms (its slowest answer is the event loop's longest stall) and the server's RSS is sampled every 2 ms.

Checks:
  flood        four 56 MB JSON infer bodies at once (shape [114688, 64], far over max_batch_size), 5 rounds: each
               answered 400; /v2/health/live within 50 ms throughout; peak RSS growth < 2x the body limit (64 MiB)
  answers      6 requests of 8 rows whose answers hold 800k numbers each, 3 at a time, as JSON and as binary
               (interleaved): /v2/health/live no slower under JSON answers than within max(50 ms, 2x its
               slowest under binary answers)
  connections  1,100 half-sent requests (`GET /v2/health/live HT`) against a server under `ulimit -n 1024`:
               50 whole requests sent meanwhile are all answered 200; the half-sent ones are closed within
               the header timeout (10 s by default) plus 5 s

    .venv/bin/python benchmarks/flood.py [--models flood,answers,connections]
"""
from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import MB, Watch, post  # noqa: E402
from serve import ROOT, Server, add_model, mlp_model  # noqa: E402
from timing import run_checks  # noqa: E402

import compilers  # noqa: E402

STALL_LIMIT = 0.050
ROUNDS = 5


def together(calls: list) -> list:
    out: list = []
    threads = [threading.Thread(target=lambda c=c: out.append(c())) for c in calls]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    return out


def mlp_repo(name: str, *models) -> Path:
    repo = ROOT / name
    add_model(repo, "mlp", mlp_model(), "[batching]\nmax_batch_size = 8\n")
    for model_name, cm in models:
        add_model(repo, model_name, cm, "[batching]\nmax_batch_size = 8\n")
    return repo


def flood() -> tuple[bool, list[str]]:
    rows = 56 * MB // (64 * 8)
    body = (b'{"inputs":[{"name":"input","shape":[%d,64],"datatype":"FP32","data":[' % rows +
            b"0.12345," * (rows * 64 - 1) + b'0.12345]}]}')
    server = Server(mlp_repo("flood-repo"))
    try:
        with Watch(server.port, server.process.pid) as watch:
            started = time.perf_counter()
            answers = [a for _ in range(ROUNDS) for a in together([lambda: post(server.port, "/v2/models/mlp/infer",
                                                                                 body)] * 4)]
            took = time.perf_counter() - started
    finally:
        server.stop()
    refused = sum(status == 400 for status, _ in answers)
    growth = watch.peak - watch.base
    ok = refused == 4 * ROUNDS and watch.slowest <= STALL_LIMIT and growth < 2 * 64 * MB
    return ok, [f"flood: 4 x {len(body) / MB:.0f} MB JSON bodies of shape [{rows}, 64] at once, {ROUNDS} times, to "
                f"the MLP (max_batch_size 8)",
                f"  {refused} of {4 * ROUNDS} answered 400 in {took:.2f} s: "
                f"{json.loads(answers[0][1])['error'][:110] if answers else '-'}...",
                "  " + watch.line(),
                f"  need: all 400, slowest <= {STALL_LIMIT * 1e3:.0f} ms, growth < 128 MB: {'OK' if ok else 'MISSED'}"]


def answers() -> tuple[bool, list[str]]:
    from torch import nn
    import torch
    torch.manual_seed(0)
    wide = compilers.compile(nn.Linear(6, 100_000).eval(), "ort-cpu", (torch.randn(2, 6),))
    x = np.random.default_rng(1).standard_normal((8, 6), dtype=np.float32)
    request = {"inputs": [{"name": "input", "shape": [8, 6], "datatype": "FP32", "data": x.ravel().tolist()}]}
    bodies = {"JSON": json.dumps(request).encode(),
              "binary": json.dumps({**request, "parameters": {"binary_data_output": True}}).encode()}
    server = Server(mlp_repo("answers-repo", ("wide", wide)))
    seen = {}
    try:
        for _ in range(2):                      # interleaved: the two kinds of answers under the same conditions
            for kind, body in bodies.items():
                with Watch(server.port, server.process.pid) as watch:
                    started = time.perf_counter()
                    got = together([lambda b=body: [post(server.port, "/v2/models/wide/infer", b)
                                                    for _ in range(2)]] * 3)
                    took = time.perf_counter() - started
                results = [r for pair in got for r in pair]
                ok = len(results) == 6 and all(status == 200 for status, _ in results)
                old = seen.get(kind)
                if old is None or watch.slowest > old[1].slowest:
                    seen[kind] = (ok, watch, took, len(results[0][1]) if results else 0)
    finally:
        server.stop()
    lines = ["answers: 6 requests (3 clients, 2 each) of 8 rows, each answered with 800k numbers; the worse of "
             "2 interleaved rounds per kind"]
    for kind, (right, watch, took, size) in seen.items():
        lines += [f"  {kind} answers ({size / MB:.1f} MB): {'all 200' if right else 'NOT all 200'}, "
                  f"{took / 2:.2f} s per answer per client", "    " + watch.line()]
    json_stall, binary_stall = seen["JSON"][1].slowest, seen["binary"][1].slowest
    ok = all(right for right, *_ in seen.values()) and json_stall <= max(STALL_LIMIT, 2 * binary_stall)
    lines.append(f"  need: all 200, JSON's slowest <= max({STALL_LIMIT * 1e3:.0f} ms, 2x binary's): "
                 f"{'OK' if ok else 'MISSED'}")
    return ok, lines


def connections() -> tuple[bool, list[str]]:
    server = Server(mlp_repo("connections-repo"), nofile=1024)
    held: list[socket.socket] = []
    try:
        for _ in range(1100):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /v2/health/live HT")
            held.append(s)
        served = 0
        for _ in range(50):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
                conn.request("GET", "/v2/health/live")
                served += conn.getresponse().status == 200
                conn.close()
            except OSError:
                pass
        started = time.perf_counter()
        closed = 0
        for s in held[-200:]:                  # the newest, not closed for others: each ends by its timeout
            s.settimeout(max(0.1, 15 - (time.perf_counter() - started)))
            try:
                while s.recv(4096):
                    pass
                closed += 1
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except socket.timeout:
                pass
        waited = time.perf_counter() - started
    finally:
        for s in held:
            s.close()
        server.stop()
    ok = served == 50 and closed == 200
    return ok, ["connections: 1,100 half-sent requests held open against a server under ulimit -n 1024",
                f"  {served} of 50 whole requests sent meanwhile answered 200",
                f"  {closed} of the newest 200 half-sent closed by the server within {waited:.1f} s",
                f"  need: 50 of 50, 200 of 200 within 15 s: {'OK' if ok else 'MISSED'}"]


if __name__ == "__main__":
    try:
        sys.exit(run_checks(__doc__, {"flood": flood, "answers": answers, "connections": connections}))
    finally:
        import shutil
        shutil.rmtree(ROOT, ignore_errors=True)
