"""The model repository: layout discovery, version policies, serving.toml checks, the traffic split, publish
and load_version, on a real (tiny) saved artifact."""
from __future__ import annotations

import random
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import compilers
from compilers.errors import ArtifactError, ConfigError
from compilers.serve.batcher import Batching
from compilers.serve.repository import Repository, ServingConfig, choose_version, publish


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    model = torch.nn.Linear(4, 2).eval()
    return compilers.compile(model, "ort-cpu", (torch.randn(2, 4),)).save(tmp_path_factory.mktemp("art") / "linear")


@pytest.fixture
def repo(tmp_path, artifact) -> Path:
    """REPO/linear/{1,2,3}/ plus an empty model dir and a stray file at the top."""
    for v in (1, 2, 3):
        shutil.copytree(artifact, tmp_path / "linear" / str(v))
    (tmp_path / "empty").mkdir()
    (tmp_path / "README.md").write_text("not a model")
    return tmp_path


def write_config(repo: Path, text: str, model: str = "linear") -> Path:
    path = repo / model / "serving.toml"
    path.write_text(text)
    return path


def test_layout_discovery_and_defaults(repo):
    (repo / "linear" / "notes.txt").write_text("ignored")
    (repo / "linear" / ".publish-abc").mkdir()                  # a staging dir: ignored
    r = Repository(repo)
    assert r.models() == ["empty", "linear"]
    entry = r.model("linear")
    assert entry.versions == (1, 2, 3) and entry.problems == ()
    assert entry.config == ServingConfig() and entry.config.batching == Batching()
    assert entry.live == (3,) and entry.weights == {3: 100.0}    # no serving.toml: the newest version
    assert entry.version_path(2) == repo / "linear" / "2"
    empty = r.model("empty")
    assert empty.versions == () and empty.live == () and "no version to serve" in empty.problems[0]
    with pytest.raises(ConfigError, match="no model 'nope'.*models: empty, linear"):
        r.model("nope")


def test_version_named_entries_that_are_not_artifacts_are_reported_not_served(repo):
    (repo / "linear" / "4").mkdir()                               # no manifest.json
    (repo / "linear" / "007").mkdir()
    entry = Repository(repo).model("linear")
    assert entry.versions == (1, 2, 3) and entry.live == (3,)
    assert len(entry.problems) == 2
    assert any("linear/4" in p and "manifest.json" in p for p in entry.problems)
    assert any("007" in p and "leading zeros" in p for p in entry.problems)


@pytest.mark.parametrize("text, live", [
    ('[versions]\npolicy = "latest"\nlatest = 2\n', (2, 3)),
    ('[versions]\nlatest = 5\n', (1, 2, 3)),
    ('[versions]\npolicy = "all"\n', (1, 2, 3)),
    ('[versions]\npolicy = "specific"\nspecific = [2, 1]\n', (1, 2)),
])
def test_version_policies(repo, text, live):
    write_config(repo, text)
    assert Repository(repo).model("linear").live == live


def test_full_config_parses_including_pad_and_traffic(repo):
    write_config(repo, """
[versions]
policy = "latest"
latest = 2
[traffic]
2 = 90
3 = 10
[batching]
max_batch_size = 8
max_queue_delay_ms = 5
preferred_batch_sizes = [4, 8]
queue_size = 64
instances = 2
[batching.pad]
input_ids = 0
attention_mask = 0.5
""")
    entry = Repository(repo).model("linear")
    assert entry.live == (2, 3) and entry.weights == {2: 90.0, 3: 10.0}
    assert entry.config.batching == Batching(max_batch_size=8, max_queue_delay_ms=5.0, preferred_batch_sizes=(4, 8),
                                             queue_size=64, instances=2, pad={"input_ids": 0.0, "attention_mask": 0.5})


@pytest.mark.parametrize("text, message", [
    ('[batcing]\nmax_batch_size = 4\n', r"unknown table\(s\) \['batcing'\]"),
    ('[versions]\npolcy = "all"\n', r"\[versions\]: unknown option\(s\) \['polcy'\]"),
    ('[versions]\npolicy = "newest"\n', r"policy = 'newest'; choose one of"),
    ('[versions]\npolicy = "specific"\n', r"needs the live versions"),
    ('[versions]\nspecific = [2]\n', r"specific is set but policy is 'latest'.*policy = \"specific\""),
    ('[versions]\npolicy = "specific"\nspecific = [2, 9]\n', r"specific names version\(s\) \[9\] that are not"),
    ('[traffic]\n1 = 90\n3 = 10\n', r"\[traffic\]: version\(s\) \[1\] are not live \(live: \[3\]\)"),
    ('[versions]\nlatest = 2\n[traffic]\n2 = 50\n3 = 40\n', r"sum to 90, not 100"),
    ('[versions]\nlatest = 2\n[traffic]\ncanary = 10\n3 = 90\n', r"key 'canary' is not a version"),
    ('[versions]\nlatest = 2\n[traffic]\n02 = 10\n3 = 90\n', r"key '02' is not a version"),
    ('[traffic]\n3 = "all"\n', r"3 = 'all' must be a percentage"),
    ('[batching]\nmax_batch_sise = 4\n', r"\[batching\]: unknown option\(s\) \['max_batch_sise'\]"),
    ('[batching]\nmax_batch_size = 0\n', r"max_batch_size = 0 must be >= 1"),
    ('[batching]\nmax_batch_size = 4\npreferred_batch_sizes = [8]\n', r"exceed max_batch_size 4"),
    ('[batching.pad]\ninput_ids = "zero"\n', r"\[batching.pad\]: input_ids = 'zero' must be a number"),
    ('[batching]\npad = 0\n', r"pad must be a table \[batching.pad\]"),
    ('versions = 3\n', r"versions must be a table"),
    ('[versions\n', r"cannot read it as TOML"),
])
def test_bad_serving_toml_is_a_config_error_naming_file_and_key(repo, text, message):
    path = write_config(repo, text)
    with pytest.raises(ConfigError, match=message) as e:
        Repository(repo).model("linear")
    assert str(path) in str(e.value)


def test_traffic_split_90_10_over_1000_seeded_picks():
    rng = random.Random(1234)
    counts = Counter(choose_version({1: 90, 2: 10}, rng) for _ in range(1000))
    assert set(counts) == {1, 2} and abs(counts[2] / 1000 - 0.10) <= 0.03
    first, second = random.Random(7), random.Random(7)
    assert [choose_version({1: 90, 2: 10}, first) for _ in range(50)] == \
           [choose_version({1: 90, 2: 10}, second) for _ in range(50)]


def test_no_split_sends_everything_to_the_newest_live_version(repo):
    write_config(repo, '[versions]\npolicy = "all"\n')
    entry = Repository(repo).model("linear")
    rng = random.Random(0)
    assert {choose_version(entry.weights, rng) for _ in range(100)} == {3}
    with pytest.raises(ConfigError, match="no live version"):
        choose_version({}, rng)


def test_publish_numbers_versions_and_loads(tmp_path, artifact):
    model_dir = tmp_path / "repo" / "linear"
    assert [publish(artifact, model_dir).name for _ in range(3)] == ["1", "2", "3"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3"]     # no staging dir left
    repo = Repository(tmp_path / "repo")
    assert repo.model("linear").versions == (1, 2, 3)
    x = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)
    np.testing.assert_allclose(repo.load_version("linear", 3)(x), compilers.load(artifact)(x))


def test_concurrent_publishes_take_distinct_numbers(tmp_path, artifact):
    model_dir = tmp_path / "linear"
    got, errors = [], []

    def one():
        try:
            got.append(publish(artifact, model_dir).name)
        except Exception as e:      # surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(got, key=int) == [str(i) for i in range(1, 9)]
    assert sorted((p.name for p in model_dir.iterdir()), key=int) == [str(i) for i in range(1, 9)]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text('{"format": "something-else", "files": {}}'), "is not readable by this compilers"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "corrupt"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "is not readable by this compilers"),
    (lambda d: (d / "model.onnx").unlink(), "model.onnx listed in the manifest is missing"),
])
def test_publish_refuses_a_non_artifact_and_leaves_nothing(tmp_path, artifact, break_it, message):
    source = shutil.copytree(artifact, tmp_path / "source")
    break_it(source)
    model_dir = tmp_path / "repo" / "linear"
    publish(artifact, model_dir)                                   # version 1, a good one
    with pytest.raises(ArtifactError, match=message):
        publish(source, model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_load_version_of_a_corrupted_artifact_names_model_and_version(repo):
    onnx = repo / "linear" / "2" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    r = Repository(repo)
    with pytest.raises(ArtifactError, match=r"model 'linear' version 2: .*model.onnx does not match its sha256"):
        r.load_version("linear", 2)
    with pytest.raises(ArtifactError, match=r"model 'linear' has no version 7.*versions: \[1, 2, 3\]"):
        r.load_version("linear", 7)
    assert r.load_version("linear", 3).target.name == "ort-cpu"
