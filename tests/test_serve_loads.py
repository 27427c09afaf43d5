"""Loads that fail (issue 19, items 6-8), on real servers over loopback: any failure to load a model is that
model's failure (the others serve, the load answers 400, the index says why, the log says it once at WARNING),
a failed load releases every engine it opened, and no answer names the server's own paths (REPO/... only)."""
from __future__ import annotations

import gc
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

import compilers
from compilers.errors import ArtifactError
from compilers.serve.repository import ModelEntry, Repository, publish
from compilers.serve.server import running
from compilers.serve.service import LocalEngines, ModelService, Version

# manifests no artifact has: nested past any parser's stack, and a number past Python's int-from-text limit
NOT_MANIFESTS = {"deep": "[" * 200000 + "]" * 200000, "huge": "1" * 5000}


def post(server, path: str) -> tuple[int, object]:
    """POST an empty body; (status, the decoded JSON answer)."""
    request = urllib.request.Request(server.url + path, b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def warnings_about(caplog, model: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "compilers" and r.levelno >= logging.WARNING
            and f"model {model!r}" in r.getMessage()]


def assert_public(answer: object, repo: Path) -> None:
    """The answer names the repository REPO, never where it is on the server."""
    text = json.dumps(answer)
    for form in {str(repo), str(repo.resolve())}:
        assert form not in text, text


def test_a_manifest_that_is_not_json_is_an_artifact_error(tmp_path, mlp):
    for name, text in NOT_MANIFESTS.items():
        mlp.save(tmp_path / name)
        (tmp_path / name / "manifest.json").write_text(text)
        with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
            compilers.load(tmp_path / name)


def test_models_that_fail_to_load_at_start_leave_the_others_serving(tmp_path, mlp, caplog):
    mlp.save(tmp_path / "a")
    repo = tmp_path / "repo"
    for name in ("mlp", *NOT_MANIFESTS):
        publish(tmp_path / "a", repo / name)
    for name, text in NOT_MANIFESTS.items():
        (repo / name / "1" / "manifest.json").write_text(text)
    with running(repo) as server:
        status, rows = post(server, "/v2/repository/index")
        assert status == 200 and rows[2] == {"name": "mlp", "version": "1", "state": "READY", "reason": ""}, rows
        for row, name in zip(rows, NOT_MANIFESTS):
            assert row["name"] == name and row["state"] == "UNAVAILABLE", rows
            assert f"REPO/{name}/1/manifest.json is corrupt" in row["reason"], rows
        assert_public(rows, repo)
        for name in NOT_MANIFESTS:                # one WARNING each, naming the file where it is on this machine
            [record] = warnings_about(caplog, name)
            assert record.levelno == logging.WARNING and str(repo / name / "1" / "manifest.json") in record.getMessage()
        status, answer = post(server, "/v2/repository/models/huge/load")
        assert status == 400 and "REPO/huge/1/manifest.json is corrupt" in answer["error"], answer
        assert_public(answer, repo)
        assert len(warnings_about(caplog, "huge")) == 2           # the reload's failure is logged too


class BrokenEngines(LocalEngines):
    """Real engines, but opening version `broken` hits a bug (an exception no load expects)."""

    broken = 0

    async def open(self, repository: Repository, entry: ModelEntry, number: int, observe) -> Version:
        if number == self.broken:
            raise RuntimeError(f"engine bug opening version {number}")
        return await super().open(repository, entry, number, observe)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """An MLP with 4 MB of weights (6 -> 1024 -> 1024 -> 3), saved for ort-cpu: an engine a leak shows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 3)).eval()
    path = tmp_path_factory.mktemp("big") / "mlp"
    compilers.compile(model, "ort-cpu", (torch.randn(4, 6),)).save(path)
    return path


def test_failed_loads_release_the_engines_they_opened(tmp_path, big, caplog):
    repo = tmp_path / "repo"
    for _ in range(2):
        publish(big, repo / "mlp")
    (repo / "mlp" / "serving.toml").write_text('[versions]\npolicy = "all"\n')
    engines = BrokenEngines()
    with running(ModelService(Repository(repo), engines=engines)) as server:
        publish(big, repo / "mlp")                 # version 3 appears, and its engine fails to open
        engines.broken = 3
        answers = []
        for i in range(100):                       # every load opens versions 1 and 2 afresh, then fails
            if i == 5:                             # the allocators have warmed up
                gc.collect()
                rss = psutil.Process().memory_info().rss
            answers.append(post(server, "/v2/repository/models/mlp/load"))
        gc.collect()
        grown = psutil.Process().memory_info().rss - rss
        assert grown < 40 << 20, f"95 failed loads grew the server by {grown >> 20} MiB; a failed load must " \
                                 f"release the engines it opened"
        for status, answer in answers:
            assert status == 400 and "RuntimeError: engine bug opening version 3" in answer["error"], answer
        status, rows = post(server, "/v2/repository/index")
        assert [(r["version"], r["state"]) for r in rows] == [("1", "READY"), ("2", "READY")]
        assert all(r["reason"].startswith("load failed: RuntimeError: engine bug") and
                   r["reason"].endswith("still serving version(s) [1, 2]") for r in rows), rows
        logged = warnings_about(caplog, "mlp")        # once per failure, with the exception's type
        assert len(logged) == 100 and all("RuntimeError: engine bug" in r.getMessage() for r in logged)
        post(server, "/v2/repository/models/mlp/unload")
        status, answer = post(server, "/v2/repository/models/mlp/load")
        assert status == 400
        status, rows = post(server, "/v2/repository/index")
        assert rows == [{"name": "mlp", "state": "UNAVAILABLE",
                         "reason": "load failed: RuntimeError: engine bug opening version 3"}], rows


def test_answers_name_the_repository_REPO(tmp_path, mlp, monkeypatch):
    mlp.save(tmp_path / "a")
    repo = tmp_path / "real"
    publish(tmp_path / "a", repo / "mlp")
    (repo / "mlp" / "serving.toml").write_text("[batching]\nmax_batch_size = 0\n")
    with running(repo) as server:                  # the case: a bad serving.toml, an absolute path
        status, rows = post(server, "/v2/repository/index")
        assert_public(rows, repo)
        assert rows[0]["reason"].startswith("load failed: REPO/mlp/serving.toml [batching]"), rows
    (tmp_path / "link").symlink_to(repo)
    monkeypatch.chdir(tmp_path)
    service = ModelService(Repository("link"))     # given, absolute and resolved: three forms
    for form in (repo, tmp_path / "link", Path("link")):
        assert service.public(f"{form}/mlp/serving.toml: wrong; see the repository") == \
            "REPO/mlp/serving.toml: wrong; see the repository"
    assert service.public(f"{repo}2/mlp and /elsewhere{repo}/mlp") == f"{repo}2/mlp and /elsewhere{repo}/mlp"
