"""Shared test helpers: `assert_same_output` checks the compiled-model contract against eager; `mlp` is a
small MLP (6 -> 16 -> 3) compiled for ort-cpu once per session, for the serving tests.

The contract: `cm(...)` returns what `model(...)` returns -- the same container types (HF ModelOutput
subclasses, torch.return_types, dicts, tuples, lists), the same pytree structure, and per tensor leaf
the same array kind (torch in -> torch out, numpy in -> numpy out), dtype and shape; float values
within tolerance, integer and bool values exact. Use the function directly or the fixture of the same name.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import compilers

FP32_ATOL = 1e-4
FP32_RTOL = 1e-3


def _describe(path: Any) -> str:
    return "output" + pytree.keystr(path)


def assert_same_output(got: Any, ref: Any, *, atol: float = FP32_ATOL, rtol: float = FP32_RTOL,
                       min_cosine: float | None = None, min_int_agreement: float = 1.0) -> None:
    """Assert `got` (compiled) matches `ref` (eager): type, pytree structure, and per leaf kind/dtype/shape/values.

    Lossy targets pass `min_cosine`: float leaves are then judged by cosine similarity instead of
    atol/rtol, and integer leaves by the fraction of equal elements (`min_int_agreement`).

    `ref` may hold torch tensors while `got` holds numpy arrays when the compiled model was called with
    numpy inputs: pass `ref` converted with `to_numpy` for that case, so the leaf kinds must match exactly.
    """
    assert type(got) is type(ref), f"output type {type(got).__qualname__}, eager gives {type(ref).__qualname__}"
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    ref_leaves, ref_spec = pytree.tree_flatten_with_path(ref)
    assert got_spec == ref_spec, \
        f"output structure differs:\n compiled {got_spec}\n eager    {ref_spec}"
    for (path, g), (_, r) in zip(got_leaves, ref_leaves):
        where = _describe(path)
        assert type(g) is type(r), f"{where}: leaf type {type(g).__qualname__}, eager gives {type(r).__qualname__}"
        if isinstance(r, torch.Tensor):
            assert g.dtype == r.dtype, f"{where}: dtype {g.dtype}, eager gives {r.dtype}"
            assert g.shape == r.shape, f"{where}: shape {tuple(g.shape)}, eager gives {tuple(r.shape)}"
            assert g.device == r.device, f"{where}: device {g.device}, eager gives {r.device}"
            assert not g.requires_grad, f"{where}: compiled output requires grad"
            g_np, r_np = g.detach().cpu().numpy(), r.detach().cpu().numpy()
        elif isinstance(r, np.ndarray):
            assert g.dtype == r.dtype, f"{where}: dtype {g.dtype}, eager gives {r.dtype}"
            assert g.shape == r.shape, f"{where}: shape {g.shape}, eager gives {r.shape}"
            g_np, r_np = g, r
        else:  # a constant leaf (None, int, str, ...)
            assert g == r, f"{where}: {g!r}, eager gives {r!r}"
            continue
        if np.issubdtype(r_np.dtype, np.floating) and min_cosine is not None:
            r64, g64 = r_np.astype(np.float64).ravel(), g_np.astype(np.float64).ravel()
            cos = float(r64 @ g64 / (np.linalg.norm(r64) * np.linalg.norm(g64))) if r64.any() else float(not g64.any())
            assert cos >= min_cosine, f"{where}: cosine similarity {cos:.6f} < {min_cosine}"
        elif np.issubdtype(r_np.dtype, np.floating):
            np.testing.assert_allclose(g_np, r_np, atol=atol, rtol=rtol, err_msg=where)
        elif min_int_agreement < 1.0:
            agree = float((g_np == r_np).mean()) if r_np.size else 1.0
            assert agree >= min_int_agreement, f"{where}: {agree:.2%} of integer elements equal, need {min_int_agreement:.0%}"
        else:
            np.testing.assert_array_equal(g_np, r_np, err_msg=f"{where} (integer/bool leaves must be exact)")


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 here (AVX512_BF16 or AMX); without it, it computes a bf16
    target in f32."""
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


NO_BF16 = "this CPU has no bf16 arithmetic (AVX512_BF16 / AMX): OpenVINO computes bf16 targets in f32 here"


def with_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with non-trivial running statistics in every BatchNorm, so that eval mode matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def to_numpy(tree: Any) -> Any:
    """`tree` with every torch tensor leaf replaced by its numpy array (what a numpy call should return)."""
    return pytree.tree_map(lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, tree)


@pytest.fixture(name="assert_same_output")
def assert_same_output_fixture():
    return assert_same_output


def pytest_terminal_summary(terminalreporter) -> None:
    """The mutation score of tests/test_mutants.py, when it ran."""
    import sys
    mutants = sys.modules.get("test_mutants")
    if mutants is not None and mutants.SCORE:
        terminalreporter.write_sep("-", "validator mutation score")
        for target, _, mutant, caught, how in mutants.SCORE:
            terminalreporter.write_line(f"{target:13s} {mutant:36s} {'caught' if caught else 'MISSED'}  {how}")
        terminalreporter.write_line(mutants.score_line())


@pytest.fixture(scope="session")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return compilers.compile(model, "ort-cpu", (torch.randn(4, 6),))


@pytest.fixture()
def clients(server):
    """(tritonclient.grpc, tritonclient.http) clients of the module's `server` fixture (a `running` server with a
    gRPC port), closed after the test."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    g = tg.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    h = th.InferenceServerClient(f"{server.host}:{server.port}", network_timeout=60)
    yield g, h
    g.close()
    h.close()
