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

import glob
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

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
