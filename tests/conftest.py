"""Test setup: without a GPU the Triton kernels run under the interpreter on CPU tensors."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedlora  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Relative Frobenius error allowed against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture
def triton_backend(monkeypatch):
    """Run fusedlora ops on the Triton kernels and start a fresh dispatch record."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    fusedlora.reset_dispatch()
    yield
    fusedlora.reset_dispatch()


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    fusedlora.reset_dispatch()
    yield


def dispatched(prefix: str = "") -> dict:
    return {k: v for k, v in fusedlora.backend_info()["dispatch"].items() if k.startswith(prefix)}


_gpu_not_run = []


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
            _gpu_not_run.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _gpu_not_run:
        terminalreporter.write_line(
            f"GPU tests: {len(_gpu_not_run)} collected, {len(_gpu_not_run)} NOT RUN (no CUDA device here); "
            "run `python -m pytest -m gpu` on a GPU machine")
