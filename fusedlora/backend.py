"""Which implementation runs: backend choice, and a record of what ran.

``FUSEDLORA_BACKEND`` (read at every call, so tests and users can switch it):
  auto    CUDA tensors run the Triton kernels, CPU tensors the PyTorch reference
  triton  Triton kernels; CPU tensors only with TRITON_INTERPRET=1 (how CI runs them)
  cuda    the compiled extension of csrc/ (not built yet: asking for it is an error)
  torch   the plain-PyTorch path of fusedlora.reference
Nothing falls back silently: every launch is counted in ``backend_info()["dispatch"]``.
"""
from __future__ import annotations

import collections
import os
import threading

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
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


def requested_backend() -> str:
    name = os.environ.get("FUSEDLORA_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FUSEDLORA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def select_backend(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``; raises if the one asked for cannot."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda":
            if triton_version() is None:
                raise RuntimeError("fusedlora: CUDA tensors need Triton, which is not importable; "
                                   "set FUSEDLORA_BACKEND=torch to run the reference path")
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
        raise RuntimeError("FUSEDLORA_BACKEND=cuda: the CUDA extension of csrc/ is not built in this version; "
                           "use auto or triton")
    return "torch"


def record(op: str, backend: str, variant: str) -> None:
    with _lock:
        _dispatch[f"{op}:{backend}:{variant}"] += 1


def reset_dispatch() -> None:
    with _lock:
        _dispatch.clear()


def backend_info() -> dict:
    """What fusedlora can run here and what it has run since the last reset."""
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
        "cuda_extension": {"available": False, "reason": "csrc/ kernels are not part of this version"},
        "dispatch": dict(_dispatch),
    }
