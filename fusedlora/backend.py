"""Which implementation runs: backend choice, and a record of what ran.

``FUSEDLORA_BACKEND`` (read at every call, so tests and users can switch it):
  auto    CUDA tensors run the Triton kernels, CPU tensors the PyTorch reference
  triton  Triton kernels; CPU tensors only with TRITON_INTERPRET=1 (how CI runs them)
  cuda    the CUDA C++ extension of csrc/ (built on first use) where it has a kernel
          (forwards of 1..16 rows without dropout: LoRA, multi-adapter, C3A, sparse);
          Triton for the rest, recorded as such
  torch   the plain-PyTorch path of fusedlora.reference
  eager   plain-PyTorch compositions built on cuBLAS/cuFFT (sparse: W + delta formed,
          then cuBLAS; C3A: cuBLAS plus PEFT's FFT delta up to 16 rows, the unscaled
          circulant through one addmm above), the reference path for the other ops;
          auto picks it for the ops in EAGER_WINS
``use_backend(name)`` overrides the variable for the calls in its scope (the
benchmarks time each backend this way). Nothing falls back silently: every launch is counted in ``backend_info()["dispatch"]``.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "eager")
_dispatch = collections.Counter()
_lock = threading.Lock()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version():
    try:
        import triton
    except Exception:  # pragma: no cover - triton ships with CUDA torch on Linux
        return None
    return triton.__version__


_forced: Optional[str] = None  # set by use_backend; process-wide, like the variable


def requested_backend() -> str:
    if _forced is not None:
        return _forced
    name = os.environ.get("FUSEDLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FUSEDLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the calls in this scope on backend ``name`` (as FUSEDLORA_BACKEND=name would).
    Process-wide, not per thread; scopes nest."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


# Auto mode's use of the CUDA extension, from GPU measurements: op -> the largest
# row count at which its CUDA kernel beat Triton (bench/results). Ops not listed
# run on Triton. H200, bf16, CUDA-graph replays (bench/results/2026-11-27_h200_2): the
# BGMV kernel at 1 row, 29.9 / 42.6 us against Triton's 32.2 / 44.6 us (4096 x 4096 /
# 4096 x 11008); C3A's kernel also won at 1 row, but EAGER_WINS sends C3A to its FFT
# composition first (48 / 74 us against 42 / 99 us); every other kernel lost (docs/cuda.md).
CUDA_WINS: dict = {"multi.forward": 1}

# Auto mode's use of the eager compositions, from GPU measurements: op -> the row count
# above which the composition ran faster than the Triton kernels (0: at every row count).
# H200, bf16, 4096 x 4096 (bench/results/2026-11-27_h200, _h200_2): PEFT-style
# compositions beat the fused Triton GEMMs at every shape for C3A (1.1-3.5x at 4096 rows)
# and for sparse above 16 rows (11x at 4096); at 1..16 rows the sparse Triton rows path
# (the base GEMM then each output feature's nonzeros) took 29-39 us against 51-59 us for
# the dense composition (CUDA-graph replays), so sparse.forward keeps Triton there.
EAGER_OPS = ("sparse.forward", "sparse.backward", "c3a.forward", "c3a.backward")  # ops with a composition
EAGER_WINS: dict = {"sparse.forward": 16, "sparse.backward": 0, "c3a.forward": 0, "c3a.backward": 0}


def select_backend(device: torch.device, op: Optional[str] = None, rows: int = 0) -> str:
    """The backend that runs ``op`` on ``rows`` rows of tensors on ``device``; raises
    if the one asked for cannot run."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda":
            if triton_version() is None:
                raise RuntimeError("fusedlora: CUDA tensors need Triton, which is not importable; "
                                   "set FUSEDLORA_BACKEND=torch to run the reference path")
            if op in EAGER_WINS and (EAGER_WINS[op] == 0 or rows > EAGER_WINS[op]):
                return "eager"
            if op in CUDA_WINS and 0 < rows <= CUDA_WINS[op]:
                from . import cuda_ext

                # never a build from here: a decode step would stall on nvcc for a minute; the
                # extension serves once built (setup.py, or fusedlora.cuda_ext.load())
                if cuda_ext.load(build=False) is not None:
                    return "cuda"
                record(op, "triton", "no-cuda-extension")  # the measured winner is missing: said, not hidden
            return "triton"
        return "torch"
    if name == "triton":
        if triton_version() is None:
            raise RuntimeError("FUSEDLORA_BACKEND=triton but Triton is not importable")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"FUSEDLORA_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
                               "(set before Python starts)")
        return "triton"
    if name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"FUSEDLORA_BACKEND=cuda needs CUDA tensors, got {device.type} tensors")
        from . import cuda_ext

        if cuda_ext.load() is None:
            raise RuntimeError(f"FUSEDLORA_BACKEND=cuda: the CUDA extension is unavailable: "
                               f"{cuda_ext.status()['reason']}")
        return "cuda"
    if name == "eager" and op not in EAGER_OPS:
        return "torch"
    return name  # torch or eager


def record(op: str, backend: str, variant: str) -> None:
    # Inside a traced module forward the lock would break the graph; the ops'
    # own records run at execution time (custom op bodies are not traced).
    if torch.compiler.is_compiling():
        return
    with _lock:
        _dispatch[f"{op}:{backend}:{variant}"] += 1


def reset_dispatch() -> None:
    with _lock:
        _dispatch.clear()


def backend_info() -> dict:
    """What fusedlora can run here and what it has run since the last reset."""
    from . import cuda_ext

    cuda_ok = torch.cuda.is_available()
    try:
        requested = requested_backend()
    except ValueError as e:
        requested = f"invalid ({e})"
    return {
        "requested": requested,
        "torch": torch.__version__,
        "triton": triton_version(),
        "triton_interpret": interpreting(),
        "cuda_available": cuda_ok,
        "device": torch.cuda.get_device_name() if cuda_ok else "cpu",
        "cuda_extension": cuda_ext.status(),
        "dispatch": dict(_dispatch),
    }
