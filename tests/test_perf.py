"""`compilers perf` against a real server on free loopback ports (HTTP and gRPC): each concurrency level measured
over both protocols side by side, bounded in time and count, with the server's split read from /metrics, a
BYTES text pipeline too; errors counted over both; a model the server lacks, an unknown protocol, a gRPC run
without its address, a malformed address and a missing gRPC client are refused clearly (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from torch import nn

from compilers.cli import main
from compilers.pipeline import MeanPool, Pipeline, Text
from compilers.serve.addresses import grpc_address, http_url
from compilers.errors import InputError
from compilers.serve.load import Share, Target, WrongAnswer, check_grpc
from compilers.serve.perf import CORE_LIMIT, Inputs, Perf, default_processes, measure, merge, parse_shapes, split
from compilers.serve.repository import publish
from compilers.serve.server import running

from test_pipeline_text import WORDS, compile_pipeline, tokenizer_json


class Embed(nn.Module):
    """A word embedding: the cheapest model behind a text pipeline (sentences in as BYTES)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(len(WORDS) + 4, 8)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlp):
    """mlp, and text (a tokenizer, an embedding, mean pooling: BYTES in), over HTTP and gRPC."""
    root = tmp_path_factory.mktemp("perf")
    mlp.save(root / "artifact")
    publish(root / "artifact", root / "repo" / "mlp")
    compile_pipeline(Pipeline(Embed().eval(), Text(tokenizer_json(), max_length=32), post=[MeanPool()])) \
        .save(root / "repo" / "text" / "1")
    with running(root / "repo", grpc_port=0) as s:
        yield s


def grpc_url(server) -> str:
    return f"{server.host}:{server.grpc_port}"


def test_perf_measures_each_level_over_both_protocols_with_the_server_split(server, tmp_path, capsys):
    out, png = tmp_path / "perf.json", tmp_path / "perf.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": [0.5] * 12},          # flat: the model's shape at --batch 2
                                         {"input": {"content": [1.0] * 6, "shape": [1, 6]}}]}))
    code = main(["perf", server.url, "--model", "mlp", "--protocol", "http,grpc", "--grpc-url", grpc_url(server),
                 "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2", "--max-requests", "400", "--batch", "2",
                 "--input-data", str(data), "--json", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert [(x["concurrency"], x["protocol"]) for x in result["levels"]] == [(1, "http"), (1, "grpc"),
                                                                           (4, "http"), (4, "grpc")]
    assert result["protocols"] == {"http": server.url, "grpc": grpc_url(server)}
    assert result["inputs"]["entries"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for level in result["levels"]:
        assert level["errors"] == 0 and level["error_messages"] == []
        assert 0 < level["requests"] <= 400 and level["throughput"] > 0
        assert level["requests"] < level["samples"] < 2 * level["requests"]      # 2 rows, then 1, in turn
        ms = level["latency_ms"]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p95"] <= ms["p99"]
        server_split = level["server"]
        assert server_split["batch_size"] >= 1 and server_split["engine_calls"] >= 1
        assert server_split["inference_ms"] > 0 and server_split["request_ms"] > 0
        assert server_split["queue_ms"] is not None and server_split["preprocess_ms"] is None   # not a pipeline
        assert level["client_cpu_ms_per_request"] > 0 and level["client_cores"] > 0
        assert level["seconds"] < 1.0 + 30       # the window closes on time (a request's timeout past it at most)
    rows = [line.split() for line in printed.splitlines()]
    for protocol in ("http", "grpc"):        # a row per level in both tables: the client's and the server's split
        assert sum(r[:2] in (["1", protocol], ["4", protocol]) for r in rows) == 4, printed
    assert "server split" in printed and "rows/call" in printed


def test_a_text_pipeline_sends_bytes_over_both_protocols(server, tmp_path):
    out, data = tmp_path / "perf.json", tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"text": ["the cat sat on the mat", "a dog"]}, {"text": ["stock market"]}]}))
    for source, rows_per_request in ((["--batch", "3"], (3,)), (["--input-data", str(data)], (2, 1))):
        assert main(["perf", server.url, "-m", "text", "--protocol", "grpc,http", "--grpc-url", grpc_url(server),
                     "--concurrency", "2", "--duration", "0.5", "--warmup", "0", "--max-requests", "60",
                     *source, "--json", str(out)]) == 0
        levels = json.loads(out.read_text())["levels"]
        assert [x["protocol"] for x in levels] == ["grpc", "http"]
        for level in levels:
            assert level["errors"] == 0 and level["requests"] > 0
            # cycled in turn over each worker's requests, so the rows lie between the fewest and the most
            fewest, most = (k * level["requests"] for k in (min(rows_per_request), max(rows_per_request)))
            assert fewest <= level["samples"] <= most
            assert level["server"]["preprocess_ms"] is not None and level["server"]["postprocess_ms"] is not None


@pytest.mark.parametrize("protocol, status", [("http", "[400]"), ("grpc", "[StatusCode.INVALID_ARGUMENT]")])
def test_errors_are_counted_not_retried_and_max_requests_bounds_a_level(server, tmp_path, capsys, protocol, status):
    out, data = tmp_path / "perf.json", tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": [[1.0] * 6]}, {"input": [[1.0] * 5]}]}))   # the 2nd: 5 wide
    code = main(["perf", server.url, "-m", "mlp", "--protocol", protocol,
                 *(["--grpc-url", grpc_url(server)] if protocol == "grpc" else []), "--concurrency", "2",
                 "--duration", "20", "--warmup", "0", "--max-requests", "20", "--input-data", str(data),
                 "--json", str(out)])
    assert code == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["protocol"] == protocol
    assert level["requests"] + level["errors"] == 20 and level["seconds"] < 10
    assert level["errors"] >= 8 and len(level["error_messages"]) == 1 and status in level["error_messages"][0]
    assert "input 'input': shape [1, 5], expected [-1, 6]" in level["error_messages"][0]      # the server's message
    assert f"concurrency 2 over {protocol}: {level['errors']} errors, first: {status}" in capsys.readouterr().out


def test_a_level_where_every_request_fails_is_exit_2(server, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": {"content": [1.0] * 5, "shape": [1, 5]}}]}))
    assert main(["perf", server.url, "-m", "mlp", "--concurrency", "1,4", "--duration", "0.3", "--warmup", "0",
                 "--input-data", str(data)]) == 2
    assert "every request failed at concurrency 1 over http" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_model_the_server_lacks_is_exit_2(server, capsys, protocol):
    assert main(["perf", server.url, "--model", "nope", "--duration", "0.1", "--concurrency", "1", "--protocol",
                 protocol, *(["--grpc-url", grpc_url(server)] if protocol == "grpc" else [])]) == 2
    err = capsys.readouterr().err
    assert "does not serve model 'nope'" in err and "InputError" in err


@pytest.mark.parametrize("args, message", [
    (["--protocol", "ws"], "--protocol takes http or grpc (both: http,grpc), not ws"),
    (["--protocol", "http,grpc"], "--protocol grpc needs --grpc-url host:port"),
    (["--grpc-url", "127.0.0.1:1"], "--grpc-url is the address for --protocol grpc"),
    (["--protocol", "grpc", "--grpc-url", "127.0.0.1"], "--grpc-url '127.0.0.1' has no port; expected HOST:PORT"),
    (["--protocol", "grpc", "--grpc-url", "http://127.0.0.1:1"], "has scheme http://, not grpc://; expected HOST:PORT")])
def test_protocol_settings_are_refused_before_any_load(args, message, capsys):
    assert main(["perf", "127.0.0.1:1", "--model", "mlp", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("url, message", [
    ("http://[::1", "URL 'http://[::1' is malformed (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999", "URL 'http://127.0.0.1:99999' has port '99999', which is not a number in 1-65535"),
    ("http://127.0.0.1:abc", "has port 'abc', which is not a number in 1-65535")])
def test_a_malformed_url_is_one_paragraph_and_builds_no_client(url, message):
    """In a process of its own: a tritonclient client half-built from such a URL used to end in "unexpected
    ValueError" and print "Exception ignored ... '_closed'" from its __del__ when collected."""
    r = subprocess.run([sys.executable, "-m", "compilers.cli", "perf", url, "-m", "mlp", "--timeout", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("compilers: InputError: "), r.stderr
    assert message in r.stderr and "expected http://HOST:PORT, e.g. http://127.0.0.1:8000" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["http://:8000"], "URL 'http://:8000' names no host"),
    (["http://::1:8000"], "URL 'http://::1:8000' names no host"),
    (["ftp://x"], "URL 'ftp://x' has scheme ftp://, not http:// or https://"),
    ([""], "URL '' is empty"),
    (["127.0.0.1:0"], "URL '127.0.0.1:0' has port '0'"),
    (["127.0.0.1:"], "URL '127.0.0.1:' has port ''"),
    (["http://a b:1"], "URL 'http://a b:1' has host 'a b', which is neither a name nor an IP address"),
    (["http://[zz]:1"], "URL 'http://[zz]:1' is malformed"),
    (["http://127.0.0.1:1/v2?x=1"], "has a query or a fragment"),
    (["http://user:secret@127.0.0.1:1"], "has a user or password, which is never sent"),
    (["127.0.0.1:1", "--protocol", "grpc", "--grpc-url", "[::1"], "--grpc-url '[::1' is malformed"),
    (["127.0.0.1:1", "--protocol", "grpc", "--grpc-url", "127.0.0.1:99999"], "--grpc-url '127.0.0.1:99999' has port"),
    (["127.0.0.1:1", "--protocol", "grpc", "--grpc-url", "grpc://127.0.0.1:1/x"], "has a path, /x"),
    (["127.0.0.1:1", "--metrics-url", "http://[::1"], "--metrics-url 'http://[::1' is malformed")])
def test_malformed_addresses_are_refused_with_the_expected_form(args, message, capsys):
    assert main(["perf", *args, "-m", "mlp", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compilers: InputError: ") and err.count("\n") == 1, err
    assert message in err and "; expected " in err and ", e.g. " in err


def test_the_usual_address_forms_are_accepted():
    assert http_url("localhost:8000").geturl() == "http://localhost:8000"
    assert http_url("https://[::1]:8443/prefix/").netloc == "[::1]:8443"
    assert http_url("HTTP://Example.com").port is None                # the scheme's port
    assert http_url("localhost:8000/metrics", "--metrics-url").geturl() == "http://localhost:8000/metrics"
    assert grpc_address("127.0.0.1:8001") == grpc_address("grpc://127.0.0.1:8001/") == "127.0.0.1:8001"
    assert grpc_address("[::1]:8001") == "[::1]:8001"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unreachable_server_is_exit_2(protocol, capsys):
    from compilers.serve.server import free_port
    port = free_port()
    assert main(["perf", f"127.0.0.1:{port}", "--model", "mlp", "--duration", "0.1", "--protocol", protocol,
                 *(["--grpc-url", f"127.0.0.1:{port}"] if protocol == "grpc" else []), "--timeout", "5"]) == 2
    assert f"cannot reach a server at 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_missing_grpc_client_names_the_extra():
    code = ("import sys; sys.modules['tritonclient.grpc'] = None\n"
            "from compilers.errors import InputError\nfrom compilers.serve.perf import GrpcClient\n"
            "try:\n    GrpcClient('127.0.0.1:1', 'mlp')\nexcept InputError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pip install 'compilers[grpc]'" in r.stdout


def test_synthetic_inputs_follow_the_metadata():
    meta = {"name": "m", "parameters": {"batch_dim": "n"},
            "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "scale", "datatype": "FP32", "shape": [3]},
                       {"name": "text", "datatype": "BYTES", "shape": [-1]}]}
    inputs = Inputs(meta, batch=4, shapes=parse_shapes(["ids:7"]))
    x = inputs.synthetic()
    assert x["ids"].shape == (4, 7) and x["ids"].dtype == np.int64 and 0 <= x["ids"].min() <= x["ids"].max() < 10
    assert x["scale"].shape == (3,) and x["scale"].dtype == np.float32
    assert x["text"].shape == (4,) and all(isinstance(w, bytes) and w.isascii() for w in x["text"])
    assert inputs.rows(x) == 4
    np.testing.assert_array_equal(Inputs(meta, 4, {"ids": [7]}).synthetic()["ids"], x["ids"])   # a fixed seed
    with pytest.raises(Exception, match="does not fit"):
        Inputs(meta, 1, {"scale": [4]}).shape("scale")


def test_the_split_is_the_mean_of_the_deltas():
    before = {name: (1.0, 10.0) for name in ("compilers_queue_seconds", "compilers_inference_seconds",
                                             "compilers_preprocess_seconds", "compilers_postprocess_seconds",
                                             "compilers_request_seconds", "compilers_batch_size")}
    after = dict(before, compilers_queue_seconds=(1.5, 20.0), compilers_batch_size=(40.0, 20.0))
    got = split(before, after)
    assert got["queue_ms"] == pytest.approx(50.0) and got["batch_size"] == pytest.approx(3.9)
    assert got["inference_ms"] is None and got["engine_calls"] == 10


def test_perf_is_client_side_only():
    code = ("import sys, compilers.serve.perf; print(sorted(m for m in sys.modules if m.split('.')[-1] in "
            "('app', 'service', 'batcher', 'server') and m.startswith('compilers') or m in ('uvicorn', 'starlette')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]"]


def test_a_level_over_two_processes_merges_their_counts(server):
    """Every request the server timed in the window is one the merged level counts: two processes' shares
    summed, not one of them (the window opens after every process's warm-up has been answered; a warm-up
    request the server records after answering it may still land in the window: at most one per connection)."""
    perf = measure(server.url, "mlp", concurrency=[4], duration=1.0, warmup=0.2, max_requests=100_000,
                   processes=2, log=lambda m: None)
    (level,) = perf.levels
    assert level.processes == 2 and len(level.client_process_cores) == 2 and level.errors == 0
    assert level.requests > 0 and level.server is not None
    assert 0 <= level.server["requests"] - level.requests <= 4, (level.requests, level.server)
    assert level.client_cpu_seconds > 0 and level.client_cpu_ms_per_request > 0
    assert level.to_dict()["processes"] == 2 and perf.settings["processes"] == 2


def test_max_requests_bounds_a_level_across_processes(server):
    perf = measure(server.url, "mlp", concurrency=[3], duration=20, warmup=0, max_requests=25, processes=2,
                   log=lambda m: None)
    (level,) = perf.levels
    assert level.processes == 2 and level.requests + level.errors == 25 and level.seconds < 10


def test_the_client_is_the_limit_when_a_process_uses_most_of_a_core():
    """The rule, on shares made by hand (loading a process to a core on a shared 2-core machine is not
    reliable): one process at CORE_LIMIT of a core or more makes the level client-limited, whatever the others
    did, and the table says so and what to do."""
    def share(cpu: float, seconds: float = 2.0) -> Share:
        return Share(requests=100, samples=100, latencies=[0.001] * 100, seconds=seconds, cpu_seconds=cpu)

    calm = merge(16, "http", [share(0.5), share(0.5)])
    busy = merge(16, "http", [share(0.5), share(2.0 * CORE_LIMIT)])
    alone = merge(2, "grpc", [share(2.0 * CORE_LIMIT), share(0.1)])
    assert not calm.client_limited and calm.client_process_cores == [0.25, 0.25]
    assert busy.client_limited and busy.client_process_cores == [0.25, CORE_LIMIT]
    assert busy.requests == 200 and busy.client_cpu_ms_per_request == pytest.approx(1000 * 2.1 / 200)
    perf = Perf("http://127.0.0.1:1", "m", "", {"http": "http://127.0.0.1:1"},
                {"duration": 2, "max_requests": 1000, "warmup": 0, "processes": None},
                {"source": "synthetic (seed 0)"}, [calm, busy, alone])
    lines = [x for x in perf.table().splitlines() if "the client was the limit" in x]
    assert lines == [
        "concurrency 16 over http: the client was the limit: a load-generator process used 0.80 of a core "
        "(2 processes); these figures understate the server: rerun with --processes 4, with cores to spare for them",
        "concurrency 2 over grpc: the client was the limit: a load-generator process used 0.80 of a core "
        "(2 processes); these figures understate the server: run the load generator on another machine"]
    assert [default_processes(n) for n in (1, 8, 9, 64)] == [1, 1, 2, 2]


def test_processes_must_be_positive(capsys):
    assert main(["perf", "127.0.0.1:1", "-m", "mlp", "--processes", "0"]) == 2
    assert "--processes must be positive, not 0" in capsys.readouterr().err


METADATA = {"name": "mlp", "versions": ["1"], "platform": "onnxruntime", "parameters": {"batch_dim": "batch"},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]}
OUTPUT = {"name": "output", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 0.0, 0.0]}
ANSWERS = {   # what the fake server answers an infer request: status, body
    "right": (200, {"model_name": "mlp", "outputs": [OUTPUT]}),
    "no outputs": (200, {"model_name": "mlp", "outputs": []}),
    "another model": (200, {"model_name": "other", "outputs": [OUTPUT]}),
    "wrong shape": (200, {"model_name": "mlp", "outputs": [dict(OUTPUT, shape=[1, 2], data=[0.0, 0.0])]}),
    "wrong datatype": (200, {"model_name": "mlp", "outputs": [dict(OUTPUT, datatype="INT64", data=[0, 0, 0])]}),
    "not json": (200, b"hello"),
    "overloaded": (503, {"error": "overloaded, try later"}),
    "not http": (None, b"SSH-2.0-OpenSSH\r\n\r\n"),
    "slow": ("sleep", 2.0)}


@pytest.fixture()
def fake():
    """A server that speaks the protocol's metadata right and answers every infer request with ANSWERS[mode]."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, status, body):
            if status == "sleep":
                time.sleep(body)
                return
            if status is None:
                self.wfile.write(body)
                self.close_connection = True
                return
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v2/models/mlp":
                self._answer(200, METADATA)
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(*ANSWERS[httpd.mode])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode, message", [
    ("no outputs", "the answer lacks output 'output'"),
    ("another model", "the answer is for model 'other', not 'mlp'"),
    ("wrong shape", "the answer's output 'output' is FP32 [1, 2]; the model declares FP32 [-1, 3]"),
    ("wrong datatype", "the answer's output 'output' is INT64 [1, 3]; the model declares FP32 [-1, 3]"),
    ("not json", "the answer is not an inference response of model 'mlp'"),
    ("overloaded", "[503] overloaded, try later"),
    ("not http", "the server's answer is not HTTP"),
    ("slow", "no answer within 0.5 s (--timeout)")])
def test_a_server_answering_the_wrong_thing_is_an_error_not_a_fast_answer(fake, mode, message):
    fake.mode = mode
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    with pytest.raises(InputError, match="every request failed at concurrency 2 over http") as e:
        measure(url, "mlp", concurrency=[2], duration=0.3, warmup=0, max_requests=50, timeout=0.5,
                log=lambda m: None)
    assert message in str(e.value)


def test_the_fake_server_is_answered_right_when_it_answers_right(fake):
    """The control of the test above: its server is measured when its answers are right."""
    fake.mode = "right"
    perf = measure(f"http://127.0.0.1:{fake.server_address[1]}", "mlp", concurrency=[2], duration=0.3, warmup=0,
                   max_requests=50, log=lambda m: None)
    (level,) = perf.levels
    assert level.errors == 0 and level.requests > 0
    assert level.server is None and "could not be read" in level.server_note     # it has no /metrics


def test_a_grpc_answer_is_checked_in_full():
    from tritonclient.grpc import service_pb2
    target = Target("grpc", "127.0.0.1:1", "mlp", "", (("output", "FP32", (-1, 3)),), (b"",), (1,), 1.0)

    def answer(model="mlp", name="output", datatype="FP32", shape=(1, 3), raw=bytes(12)):
        r = service_pb2.ModelInferResponse(model_name=model)
        r.outputs.add(name=name, datatype=datatype, shape=list(shape))
        r.raw_output_contents.append(raw)
        return r.SerializeToString()

    check_grpc(target, answer())
    for wrong, message in ((answer(model="other"), "for model 'other'"), (answer(name="x"), "lacks output"),
                           (answer(shape=(1, 2), raw=bytes(8)), r"is FP32 \[1, 2\]"),
                           (answer(raw=bytes(8)), "not an inference response"), (b"\xff" * 7, "not an inference")):
        with pytest.raises(WrongAnswer, match=message):
            check_grpc(target, wrong)
