"""The CUDA C++ extension of csrc/: found prebuilt, or compiled on first use.

``setup.py`` builds ``fusedlora._C`` ahead of time when torch has CUDA and
nvcc is found at install time (``pip install --no-build-isolation``). Otherwise
``load()`` compiles csrc/ with torch's cpp_extension and ninja into a cache
folder (``FUSEDLORA_EXT_DIR``, default ~/.cache/fusedlora/ext) the first time
the extension is needed. ``FUSEDLORA_BUILD_EXT=0`` forbids that build.
A missing extension is never papered over: ``status()`` says why, and asking
for the ``cuda`` backend without it raises.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from .backend import Choice, record

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
# libstdc++ as the shared library that torch itself uses, named before the compiler's own
# link line: a g++ that links it statically (the H200 image's did) would otherwise put a
# second libstdc++ inside the module, whose iostreams broke against the process's one
# (a segfault at the first `<<`; csrc/bindings.cpp no longer streams either). setup.py
# passes the same flag.
LINK_FLAGS = ["-l:libstdc++.so.6"]
_lock = threading.Lock()
_state = {"module": None, "error": None}


def _sources():
    return sorted(glob.glob(str(_CSRC / "*.cpp")) + glob.glob(str(_CSRC / "*.cu")))


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for src in _sources() + sorted(glob.glob(str(_CSRC / "*.h"))):
        digest.update(Path(src).read_bytes())
    digest.update(f"{torch.__version__}|{os.environ.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0')}|{LINK_FLAGS}".encode())
    root = Path(os.environ.get("FUSEDLORA_EXT_DIR", Path.home() / ".cache" / "fusedlora" / "ext"))
    return root / digest.hexdigest()[:16]


def _cannot_build() -> Optional[str]:
    if os.environ.get("FUSEDLORA_BUILD_EXT", "auto").lower() in ("0", "false", "no"):
        return "FUSEDLORA_BUILD_EXT=0 forbids building the extension"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not _sources():
        return f"no CUDA sources in {_CSRC} (an installed package without the source tree)"
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        return "nvcc not found (set CUDA_HOME)"
    return None


def load(build: bool = True):
    """The extension module, building it on first use if allowed; None if unavailable."""
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        # An error is only recorded after the import below failed. auto asks at every decode
        # call of a measured op: the import, the source glob and the nvcc lookup run once,
        # and a failed build is not retried in this process.
        if _state["error"] is not None and (not build or _state["error"].startswith("build failed")):
            return None
        try:
            from . import _C  # ahead-of-time build from setup.py

            _state["module"] = _C
            return _C
        except ImportError:
            pass
        reason = _cannot_build()
        if reason or not build:
            _state["error"] = _state["error"] or reason or "not built yet (fusedlora.cuda_ext.load() builds it)"
            return None
        if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        from torch.utils import cpp_extension

        build_dir = _build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            _state["module"] = cpp_extension.load(
                name="fusedlora_C", sources=_sources(), build_directory=str(build_dir),
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], extra_ldflags=LINK_FLAGS,
                verbose=False)
            _state["error"] = None
        except Exception as e:  # the compiler's message is the useful part
            _state["error"] = f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
        return _state["module"]


def status() -> dict:
    """What backend_info reports; never starts a build."""
    module = _state["module"]
    if module is None:
        load(build=False)
        module = _state["module"]
    if module is not None:
        return {"available": True, "path": getattr(module, "__file__", None)}
    return {"available": False, "reason": _state["error"] or _cannot_build()}


# The GEMV of the decode kernels (csrc/fusedlora.h, Gemv): "fma" on CUDA cores, the one
# measured on the H200 (bench/results/2026-11-27_h200_2: correct, 32% of the HBM roof at 1
# row, 9% at 16), or "mma" on tensor cores (fp16/bf16, aligned rows, sm_80+; written for
# 16 rows, where the FMA GEMV is bound by its FMAs; not yet run on a GPU). The default
# stays "fma" until a GPU run of `python -m fusedlora bench --paths decode` (column
# cuda-mma) and tests/test_cuda_ext.py say otherwise.
GEMVS = ("fma", "mma")
_GEMV = Choice("FUSEDLORA_CUDA_GEMV", GEMVS, "fma", "use_gemv")
requested_gemv = _GEMV.get
use_gemv = _GEMV.use  # the decode kernels' GEMV in a scope, as FUSEDLORA_CUDA_GEMV=name would


@functools.lru_cache(maxsize=None)
def _sm_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def mma_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The tensor-core GEMV's contract (the binding raises outside it): 16-bit operands,
    rows of x and W unit-stride and 16-byte aligned, an sm_80+ device."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.stride(-1) == 1
            and all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 for t in (x, weight))
            and _sm_major(x.device) >= 8)


def gemv_for(op: str, variant: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """The GEMV a decode call runs: the requested one where it can run, else "fma"; recorded
    as ``op:cuda:variant`` (suffix ``-mma`` for the tensor cores)."""
    name = "mma" if requested_gemv() == "mma" and mma_serves(x, weight) else "fma"
    record(op, "cuda", variant if name == "fma" else f"{variant}-mma")
    return name
