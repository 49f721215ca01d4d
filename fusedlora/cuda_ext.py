"""The CUDA C++ extension of csrc/: found prebuilt, or compiled on first use.

``setup.py`` builds ``fusedlora._C`` ahead of time when torch has CUDA and nvcc is
found at install time (``pip install --no-build-isolation``) and writes beside it a
record of what it was built from (``_C.build.json``: a digest of csrc/, torch, Python);
a prebuilt module whose record does not match this source tree, torch or Python is not
imported (a stale in-place build after an edit of csrc/, or one left by another torch).
Otherwise ``load()`` compiles csrc/ with torch's cpp_extension and ninja into a cache
folder (``FUSEDLORA_EXT_DIR``, default ~/.cache/fusedlora/ext), one sub-folder per key
(csrc/'s contents, torch, Python, the arch list, CUDA_HOME, the flags), under a file lock
that one process holds while the others wait; a finished build is marked there, and a
later process imports the marked module without starting a build (``load(build=False)``,
which is what ``auto`` dispatch calls). ``FUSEDLORA_BUILD_EXT``: ``0`` forbids the
compile-on-first-use path (no build, no cache), ``1`` makes ``load()`` raise when the
extension cannot be had, unset or ``auto`` builds on an explicit ``load()``; any other value
is an error. A missing extension is never papered over: ``status()`` says why, and asking
for the ``cuda`` backend without it raises.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from . import build_config
from .backend import Choice, record
from .build_config import (CFLAGS, CUDA_CFLAGS, DEFAULT_ARCH_LIST, LINK_FLAGS, PREBUILT_RECORD,  # noqa: F401
                           arch_list, build_mode, nvcc_home)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
NAME = "fusedlora_C"
_lock = threading.Lock()
_state = {"module": None, "error": None, "built": None, "prebuilt_ignored": None}


def source_digest(csrc: Path = None) -> str:
    """build_config.source_digest of csrc/ (default: this source tree's)."""
    return build_config.source_digest(csrc or _CSRC)


def _sources():
    return sorted(glob.glob(str(_CSRC / "*.cpp")) + glob.glob(str(_CSRC / "*.cu")))


def _build_dir() -> Path:
    key = "|".join([source_digest(), torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag,
                    arch_list(), str(nvcc_home()), os.environ.get("CXX", ""), repr((CFLAGS, CUDA_CFLAGS, LINK_FLAGS))])
    root = Path(os.environ.get("FUSEDLORA_EXT_DIR", Path.home() / ".cache" / "fusedlora" / "ext"))
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def _cannot_build() -> Optional[str]:
    try:
        if build_mode() == "0":
            return "FUSEDLORA_BUILD_EXT=0 forbids building the extension"
        arch_list()
    except ValueError as e:
        return str(e)
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not _sources():
        return f"no CUDA sources in {_CSRC} (an installed package without the source tree)"
    if nvcc_home() is None:
        return build_config.no_nvcc_reason()
    return None


def prebuilt_problem(module_file: str, csrc: Path = None) -> Optional[str]:
    """Why the prebuilt module at ``module_file`` must not be imported, or None: its
    record (setup.py's) is missing or names another torch, Python or source tree."""
    record_file = Path(module_file).parent / PREBUILT_RECORD
    csrc = Path(csrc or _CSRC)
    has_sources = any(csrc.glob("*.cu")) or any(csrc.glob("*.cpp"))
    try:
        built = json.loads(record_file.read_text())
    except (OSError, ValueError):
        built = None
    if built is None:
        # an older build, or one copied by hand: trusted only where no sources can disagree
        return f"{module_file} has no {PREBUILT_RECORD} beside it" if has_sources else None
    for key, now in (("torch", torch.__version__), ("python", sys.implementation.cache_tag)):
        if built.get(key) != now:
            return f"{module_file} was built for {key} {built.get(key)}, this is {now}"
    if has_sources and built.get("sources") != source_digest(csrc):
        return f"{module_file} was built from other sources than {csrc} (rebuild: pip install -e .)"
    return None


def _prebuilt():
    """fusedlora._C from setup.py, if present and current; its problem is kept in _state."""
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None
    problem = prebuilt_problem(spec.origin)
    if problem is None:
        try:
            from . import _C

            return _C
        except ImportError as e:
            problem = f"{spec.origin} does not import: {e}"
    _state["prebuilt_ignored"] = problem
    return None


@contextlib.contextmanager
def _file_lock(path: Path):
    """An OS-level lock (released if the holder dies), so that two processes building the
    same key do not write the same files; the second waits, then finds the build done."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_built(build_dir: Path):
    """The module of a finished build in build_dir (marked by load()), or None (also when
    it does not import: then it is built again)."""
    try:
        # the module's file name: cpp_extension names a second build of other sources
        # in one process fusedlora_C_v1, and its init function after it
        so = build_dir / (build_dir / f"{NAME}.ok").read_text().strip()
        if so.parent != build_dir or so.suffix != ".so" or not so.exists():
            return None
        spec = importlib.util.spec_from_file_location(so.stem, str(so))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (OSError, ImportError):
        return None


def _build(build_dir: Path):
    """Compile csrc/ into build_dir (ninja: only what changed) and import the module. The
    mark is written (atomically) only after the import, so a build that failed or was
    killed half-way is never taken for a finished one; ninja redoes what it did not log."""
    from torch.utils import cpp_extension

    home = nvcc_home()
    (build_dir / f"{NAME}.ok").unlink(missing_ok=True)
    # the arch list and CUDA_HOME only for this build: other extensions of the process keep
    # theirs. cpp_extension fixed its CUDA_HOME when imported (its guess may be a folder
    # with an nvcc wrapper and no headers): this build's toolkit, then the guess again.
    guessed, cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME, str(home)
    try:
        with _env(TORCH_CUDA_ARCH_LIST=arch_list(), CUDA_HOME=str(home)):
            module = cpp_extension.load(
                name=NAME, sources=_sources(), build_directory=str(build_dir),
                extra_cflags=list(CFLAGS), extra_cuda_cflags=list(CUDA_CFLAGS), extra_ldflags=list(LINK_FLAGS),
                verbose=False)  # copies: cpp_extension appends to the lists it is given
    finally:
        cpp_extension.CUDA_HOME = guessed
    tmp = build_dir / f"{NAME}.ok.tmp{os.getpid()}"
    tmp.write_text(Path(module.__file__).name + "\n")
    os.replace(tmp, build_dir / f"{NAME}.ok")
    return module


def load(build: bool = True):
    """The extension module, building it on first use if allowed; None if unavailable
    (with FUSEDLORA_BUILD_EXT=1 an explicit load() raises instead)."""
    module = _load(build)
    if module is None and build and build_mode() == "1":
        raise RuntimeError(f"FUSEDLORA_BUILD_EXT=1: the CUDA extension is unavailable: {_state['error']}")
    return module


def _load(build: bool):
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        # An error is only recorded after the import below failed. auto asks at every decode
        # call of a measured op: the import, the source glob and the nvcc lookup run once,
        # and a failed build is not retried in this process.
        if _state["error"] is not None and (not build or _state["error"].startswith("build failed")):
            return None
        module = _prebuilt()  # ahead-of-time build from setup.py
        if module is not None:
            _state.update(module=module, error=None, built="ahead-of-time")
            return module
        reason = _cannot_build()
        if reason:
            _state["error"] = reason
            return None
        build_dir = _build_dir()
        module = _import_built(build_dir)  # built by an earlier process
        if module is None and not build:
            _state["error"] = _state["error"] or "not built yet (fusedlora.cuda_ext.load() builds it)"
            return None
        if module is None:
            try:
                build_dir.mkdir(parents=True, exist_ok=True)
                with _file_lock(build_dir / "fusedlora.lock"):
                    module = _import_built(build_dir) or _build(build_dir)  # another process may have built it
            except Exception as e:  # the compiler's message is the useful part
                _state["error"] = f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
                return None
        _state.update(module=module, error=None, built="jit")
        return module


def status() -> dict:
    """What backend_info reports; never starts a build. ``built``: "ahead-of-time"
    (setup.py) or "jit" (compiled on first use, now or by an earlier process);
    ``prebuilt_ignored``: why a fusedlora._C found beside the package was not imported."""
    module = _state["module"]
    if module is None:
        _load(build=False)
        module = _state["module"]
    info = {"available": module is not None}
    if module is not None:
        info.update(path=getattr(module, "__file__", None), built=_state["built"])
    else:
        info["reason"] = _state["error"] or _cannot_build()
    if _state["built"] != "ahead-of-time":
        try:
            info["arch_list"] = arch_list()
        except ValueError as e:
            info["arch_list"] = f"invalid ({e})"
    if _state["prebuilt_ignored"]:
        info["prebuilt_ignored"] = _state["prebuilt_ignored"]
    return info


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


DECODE_ROWS = 16  # csrc's kMaxDecodeRows


MAX_FEATURES = 1 << 30  # csrc/fusedlora.h kMaxFeatures


def decode_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The decode kernels' shape contract (the binding raises outside it; the ops then run
    Triton, recorded): 1..16 rows, at least one input and one output feature, W unit-stride
    along in_features, at most 2^30 features on each side (the binding's kMaxFeatures)."""
    return (0 < x.shape[0] <= DECODE_ROWS and 0 < x.shape[1] <= MAX_FEATURES and 0 < weight.shape[0] <= MAX_FEATURES
            and weight.stride(1) == 1)


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
