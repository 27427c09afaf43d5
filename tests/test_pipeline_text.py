"""Text pipelines (issue 20): a Hugging Face tokenizer carried in the artifact, mean pooling and normalization
compiled into the graph, texts in and named answers out, in Python and over the protocol (BYTES, JSON and
binary), with requests of different lengths batched after pre-processing, padded to the longest, and each
answered as it is answered alone. A tiny BERT (random weights, fixed seed) and a word-level tokenizer built here
keep it fast; benchmarks/pipeline.py runs the real MiniLM."""
from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn
from tritonclient.utils import InferenceServerException

import compilers
from compilers.pipeline import CLS, CompiledPipeline, MeanPool, Normalize, Pipeline, Softmax, Text, TopK
from compilers.serve.repository import alone_reason
from compilers.serve.server import running

WORDS = "the a cat dog sat on mat stock market fell today sharply is was and of to very big small".split()
SENTENCES = ["the cat sat on the mat", "a dog", "the stock market fell sharply today", "a very big dog sat",
             "the small cat", "stock market", "the dog was very small and the cat was big", "cat",
             "a cat and a dog sat on a mat", "the market is big", "a small dog fell", "the cat"]


def tokenizer_json() -> str:
    """A word-level tokenizer with BERT's special tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def encoder() -> Pipeline:
    return Pipeline(tiny_bert(), Text(tokenizer_json(), max_length=32), post=[MeanPool(), Normalize()])


class Classifier(nn.Module):
    """BERT's [CLS] vector through a linear head: three classes' logits."""

    def __init__(self):
        super().__init__()
        self.bert = tiny_bert(1)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


class IgnoresMask(nn.Module):
    """Averages every position, the padding's too: its answer to a text depends on how long the batch is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(len(WORDS) + 4, 8)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids).mean(1)


class MaxNoMask(nn.Module):
    """A max over every position, padding included, its mask unused (issue 32's repro)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(len(WORDS) + 4, 8)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids).amax(1)


def compile_pipeline(pipe: Pipeline, target: str = "ort-cpu") -> CompiledPipeline:
    return compilers.compile(pipe, target, SENTENCES[:4], samples=[SENTENCES[i:i + 4] for i in range(0, 12, 4)])


@pytest.fixture(scope="module")
def served_encoder(tmp_path_factory):
    """The tiny encoder compiled for ort-cpu, saved into a repository as model "enc" version 1."""
    repo = tmp_path_factory.mktemp("repo")
    pipe = encoder()
    cm = compile_pipeline(pipe)
    cm.save(repo / "enc" / "1")
    (repo / "enc" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 20\n")
    return repo, pipe, cm


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_a_text_pipeline_answers_texts_as_the_eager_pipeline_does(target):
    pipe = encoder()
    cm = compile_pipeline(pipe, target)
    assert isinstance(cm, CompiledPipeline) and cm.report.validation.passed
    texts = ["the cat sat", "a dog", "the stock market fell sharply today and the dog sat on the mat"]
    got, want = cm(texts), pipe(texts)
    assert list(got) == ["embedding"] and got["embedding"].shape == (3, 32)
    torch.testing.assert_close(got["embedding"], want["embedding"], atol=1e-5, rtol=1e-4)
    # the tensor model stays reachable, and is the composed module: pooling and normalization in the graph
    tensors = pipe.tensors(texts)
    torch.testing.assert_close(cm.model(**tensors)["embedding"], want["embedding"], atol=1e-5, rtol=1e-4)
    assert tensors["input_ids"].shape == (3, 15), "padded to the batch's longest text, not to max_length"
    norms = got["embedding"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(3), atol=1e-5, rtol=0)


def test_a_pipeline_artifact_saves_loads_and_is_pinned_by_digest(tmp_path, served_encoder):
    _, pipe, cm = served_encoder
    cm.save(tmp_path / "enc")
    assert (tmp_path / "enc" / "pipeline" / "tokenizer.json").is_file()
    loaded = compilers.load(tmp_path / "enc", digest=cm.digest)
    assert isinstance(loaded, CompiledPipeline) and loaded.digest == cm.digest
    torch.testing.assert_close(loaded(SENTENCES)["embedding"], pipe(SENTENCES)["embedding"], atol=1e-5, rtol=1e-4)
    # the tokenizer is part of what the digest covers: another vocabulary is another model
    vocab_file = tmp_path / "enc" / "pipeline" / "tokenizer.json"
    vocab_file.write_text(vocab_file.read_text().replace('"cat":', '"cot":'))
    with pytest.raises(compilers.ArtifactError, match="tokenizer.json"):
        compilers.load(tmp_path / "enc")


def test_padding_that_changes_answers_is_found_at_compile_and_never_batched(tmp_path):
    ignores = compile_pipeline(Pipeline(IgnoresMask(), Text(tokenizer_json(), max_length=32)))
    assert ignores.steps.padded is False
    assert any("padding is not proven harmless" in n and "aten.mean.dim over the sequence" in n
               for n in ignores.report.notes), ignores.report.notes
    masked = compile_pipeline(encoder())
    assert masked.steps.padded is True
    assert masked.report.padding["why"].startswith("proven from the graph: the mask reaches each of the"), \
        masked.report.padding
    # served, requests of different lengths are then never padded into one call: each answer is its own
    ignores.save(tmp_path / "repo" / "avg" / "1")
    (tmp_path / "repo" / "avg" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 50\n")
    assert "padding is not proven harmless" in alone_reason(tmp_path / "repo" / "avg" / "1")  # publish's note
    with running(tmp_path / "repo") as server:
        answers = _concurrently(server, "avg", SENTENCES, "output")
    for sentence, got in zip(SENTENCES, answers):
        np.testing.assert_allclose(got, ignores([sentence])["output"].numpy()[0], rtol=1e-5, atol=1e-6)
    # nor may serving.toml pad it by hand
    (tmp_path / "repo" / "avg" / "serving.toml").write_text("[batching.pad]\ninput_ids = 0\nattention_mask = 0\n")
    with running(tmp_path / "repo") as server:
        index = json.load(urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/repository/index", b"{}")))
    assert "pads a pipeline whose padding compile did not prove harmless" in index[0]["reason"]
    # and a pipeline proven harmless for its own pad values is never padded with others by serving.toml
    masked.save(tmp_path / "repo" / "masked" / "1")
    (tmp_path / "repo" / "masked" / "serving.toml").write_text("[batching.pad]\nattention_mask = 1\n")
    with running(tmp_path / "repo") as server:
        index = json.load(urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/repository/index", b"{}")))
    reasons = {m["name"]: m.get("reason", "") for m in index}
    assert "pads attention_mask with another value than the pipeline's own (attention_mask = 0" in reasons["masked"]


def test_a_model_that_pools_without_its_mask_is_never_padded_and_each_sentence_is_answered_as_alone(tmp_path):
    """Issue 32, item 2: padding was checked on the example batch, already padded, with 5 more pad positions, which
    a max over every position survives: recorded padded=True, the server padded short sentences to the longest of
    their call, and 6 of 36 concurrent answers differed from the sentence alone. The graph shows the max over the
    sequence that no mask reaches: not proven, so requests share calls only at equal lengths."""
    pipe = Pipeline(MaxNoMask().eval(), Text(tokenizer_json(), max_length=32))
    cm = compilers.compile(pipe, "ort-cpu", SENTENCES[:4])
    cm.save(tmp_path / "repo" / "max" / "1")
    (tmp_path / "repo" / "max" / "serving.toml").write_text("[batching]\nmax_batch_size = 8\n"
                                                            "max_queue_delay_ms = 50\n")
    texts = SENTENCES + [s + " and the dog sat" for s in SENTENCES] + ["the " + s for s in SENTENCES]
    assert len(texts) == 36
    with running(tmp_path / "repo") as server:
        answers = _concurrently(server, "max", texts, "output")
    differs = [t for t, got in zip(texts, answers)
               if not np.allclose(got, pipe([t])["output"].numpy()[0], rtol=1e-5, atol=1e-6)]
    assert not differs, f"{len(differs)} of {len(texts)} answers differ from the sentence alone: {differs}"
    assert cm.steps.padded is False
    why = cm.report.padding["why"]
    assert "aten.amax.default over the sequence (dim 1) reads the padding: the mask does not reach it" in why, why
    assert "test_pipeline_text.py" in why, "the model's line is named"


def _infer(c: triton.InferenceServerClient, model: str, texts: list[str], output: str, binary: bool = True):
    t = triton.InferInput("text", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return c.infer(model, [t], outputs=[triton.InferRequestedOutput(output, binary_data=binary)]).as_numpy(output)


def _concurrently(server, model: str, texts: list[str], output: str) -> list[np.ndarray]:
    """One request per text, each from its own thread and client (tritonclient's clients are not shareable)."""
    answers: list = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def send(i: int) -> None:
        c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
        start.wait(timeout=30)
        answers[i] = _infer(c, model, [texts[i]], output)[0]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(a is not None for a in answers), "a request did not finish"
    return answers


def test_a_served_text_pipeline_takes_sentences_over_json_and_binary(served_encoder):
    repo, pipe, cm = served_encoder
    with running(repo) as server:
        meta = json.load(urllib.request.urlopen(f"{server.url}/v2/models/enc"))
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]
        c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
        want = cm(SENTENCES[:3])["embedding"].numpy()
        for binary in (True, False):
            np.testing.assert_allclose(_infer(c, "enc", SENTENCES[:3], "embedding", binary), want, rtol=1e-5, atol=1e-6)
        # the curl of the README: plain JSON strings
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                       "data": ["the cat sat on the mat", "naïve café 東京"]}]}).encode()
        answer = json.load(urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/models/enc/infer", body)))
        out = answer["outputs"][0]
        np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]),
                                   cm(["the cat sat on the mat", "naïve café 東京"])["embedding"].numpy(),
                                   rtol=1e-5, atol=1e-6)
        # more sentences than a call takes, or a text longer than the pipeline reads, are refused up front
        with pytest.raises(InferenceServerException, match="at most 8 per request"):
            _infer(c, "enc", SENTENCES[:9], "embedding")
        with pytest.raises(InferenceServerException, match="more than this text pre-processing takes"):
            _infer(c, "enc", ["cat " * 300_000], "embedding")


def test_concurrent_sentences_of_any_length_are_batched_and_answered_as_alone(served_encoder):
    repo, pipe, cm = served_encoder
    texts = SENTENCES + [s + " and the dog sat" for s in SENTENCES[:4]]
    with running(repo) as server:
        answers = _concurrently(server, "enc", texts, "embedding")
        metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
    for text, got in zip(texts, answers):
        np.testing.assert_allclose(got, cm([text])["embedding"].numpy()[0], rtol=1e-5, atol=1e-6)
    rows = _metric(metrics, 'compilers_batch_size_sum{model="enc",version="1"}')
    calls = _metric(metrics, 'compilers_batch_size_count{model="enc",version="1"}')
    assert rows == len(texts) and calls < len(texts), "requests of different lengths shared engine calls"
    for stage in ("preprocess", "queue", "inference", "postprocess"):
        assert _metric(metrics, f'compilers_{stage}_seconds_count{{model="enc",version="1"}}') > 0, stage


def _metric(text: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def test_a_classifier_pipeline_answers_labels(tmp_path):
    pipe = Pipeline(Classifier().eval(), Text(tokenizer_json(), max_length=32), post=[Softmax(), TopK(2)],
                    labels=["negative", "neutral", "positive"])
    cm = compile_pipeline(pipe)
    got, want = cm(SENTENCES[:5]), pipe(SENTENCES[:5])
    assert list(got) == ["scores", "indices", "labels"]
    assert got["labels"].shape == (5, 2) and set(got["labels"].ravel()) <= {"negative", "neutral", "positive"}
    np.testing.assert_array_equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=1e-4)
    cm.save(tmp_path / "repo" / "cls" / "1")
    with running(tmp_path / "repo") as server:
        c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
        for binary in (True, False):
            labels = _infer(c, "cls", SENTENCES[:5], "labels", binary)
            np.testing.assert_array_equal(labels.astype(str), want["labels"].astype(str))


def test_labels_must_name_an_output_and_items_are_bounded():
    with pytest.raises(ValueError, match="labels name the output 'indices'"):
        Pipeline(tiny_bert(), Text(tokenizer_json()), post=[CLS()], labels=["a", "b"])
    pipe = encoder()
    with pytest.raises(compilers.InputError, match="more than this text pre-processing takes"):
        pipe(["cat " * 300_000])
    with pytest.raises(compilers.InputError, match="text 1 is a int"):
        pipe(["cat", 3])
    with pytest.raises(compilers.InputError, match="not UTF-8"):
        pipe([b"\xff\xfe"])


def test_the_cli_compiles_a_pipeline_factory_and_the_triton_export_says_what_it_leaves_out(tmp_path, monkeypatch, capsys):
    from compilers import cli
    from compilers.export.triton import triton_model
    (tmp_path / "factory.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport test_pipeline_text as t\n"
        "from compilers.pipeline import MeanPool, Normalize, Text\n\n"
        "def pipeline():\n    return {'model': t.encoder(), 'example_inputs': t.SENTENCES[:4]}\n\n"
        "def parts():\n    return {'model': t.tiny_bert(), 'pre': Text(t.tokenizer_json(), max_length=32),\n"
        "            'post': [MeanPool(), Normalize()], 'example_inputs': t.SENTENCES[:4]}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "factory.py:pipeline", "-t", "ort-cpu", "-o", "repo/enc/1"]) == 0
    assert "compiling Pipeline for ort-cpu" in capsys.readouterr().err
    # a factory may give the pipeline's parts; validate takes the artifact and the eager pipeline, on texts
    torch.save([SENTENCES[4:8], SENTENCES[8:]], tmp_path / "samples.pt")
    assert cli.main(["validate", "repo/enc/1", "factory.py:parts", "--samples", "samples.pt"]) == 0
    assert "PASSED" in capsys.readouterr().out
    loaded = compilers.load(tmp_path / "repo" / "enc" / "1")
    assert isinstance(loaded, CompiledPipeline)
    torch.testing.assert_close(loaded(SENTENCES)["embedding"], encoder()(SENTENCES)["embedding"], atol=1e-5, rtol=1e-4)
    exported = triton_model(tmp_path / "repo" / "enc" / "1", "enc")
    assert any("its pre-processing and labels are not exported" in c for c in exported.caveats)


def test_a_text_pipeline_with_token_type_ids_and_cls_pooling():
    pipe = Pipeline(tiny_bert(3), Text(tokenizer_json(), max_length=32, type_ids=True), post=[CLS()])
    assert pipe.pre.tensor_names == ("input_ids", "attention_mask", "token_type_ids")
    cm = compile_pipeline(pipe)
    torch.testing.assert_close(cm(SENTENCES)["embedding"], pipe(SENTENCES)["embedding"], atol=1e-5, rtol=1e-4)
    assert cm.steps.padded is True


def test_reloads_fail_no_pipeline_request_even_while_it_is_being_pre_processed(served_encoder):
    """Requests large enough to be tokenized in a thread, while the model is reloaded again and again: each is
    answered (the retired version finishes what it holds), none fails."""
    repo, pipe, cm = served_encoder
    long_texts = [" ".join(SENTENCES) * 8] * 4           # ~3 KiB each: pre-processed off the event loop
    want = cm(long_texts)["embedding"].numpy()
    failures: list[str] = []
    with running(repo) as server:
        def send() -> None:
            c = triton.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
            for _ in range(15):
                try:
                    np.testing.assert_allclose(_infer(c, "enc", long_texts, "embedding"), want, rtol=1e-5, atol=1e-6)
                except Exception as e:   # every failure is counted
                    failures.append(repr(e))
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        reloads = 0
        while any(t.is_alive() for t in threads) and reloads < 8:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/v2/repository/models/enc/load", b"{}"))
            reloads += 1
        for t in threads:
            t.join(timeout=120)
    assert reloads >= 3 and not failures, failures[:3]


def test_labels_never_name_an_index_beyond_them():
    pipe = Pipeline(Classifier().eval(), Text(tokenizer_json(), max_length=32), post=[Softmax(), TopK(3)],
                    labels=["negative", "positive"])          # three classes, two labels: a configuration bug
    with pytest.raises(ValueError, match="beyond the 2 labels"):
        for start in range(0, len(SENTENCES), 4):             # some sentence's third-ranked class is index 2
            pipe(SENTENCES[start:start + 4])
