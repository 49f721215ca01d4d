"""How the CUDA extension is built: the settings setup.py and fusedlora.cuda_ext share.

Standard library only: setup.py loads this file by path, before torch (or fusedlora,
whose import needs torch) can be imported.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Optional

# sm_80 and sm_90 machine code, and compute_90 PTX that the driver compiles for newer GPUs
# (Blackwell runs no sm_90 code).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
PREBUILT_RECORD = "_C.build.json"  # written by setup.py beside fusedlora/_C*.so
# libstdc++ as the shared library that torch itself uses, named before the compiler's own
# link line: a g++ that links it statically (the H200 image's did) would otherwise put a
# second libstdc++ inside the module, whose iostreams broke against the process's one
# (a segfault at the first `<<`; csrc/bindings.cpp no longer streams either).
LINK_FLAGS = ("-l:libstdc++.so.6",)
CFLAGS = ("-O3",)
CUDA_CFLAGS = ("-O3",)
_MODES = {"": "auto", "auto": "auto", "0": "0", "false": "0", "no": "0", "off": "0",
          "1": "1", "true": "1", "yes": "1", "on": "1"}
_ARCH = re.compile(r"^\d+\.\d+[af]?(\+PTX)?$")
_NAMED_ARCHS = ("Kepler", "Maxwell", "Pascal", "Volta", "Turing", "Ampere", "Ada", "Hopper", "Blackwell", "Rubin")


def build_mode() -> str:
    """FUSEDLORA_BUILD_EXT as "auto", "0" or "1"; anything else is a ValueError."""
    raw = os.environ.get("FUSEDLORA_BUILD_EXT", "auto")
    mode = _MODES.get(raw.strip().lower())
    if mode is None:
        raise ValueError(f"FUSEDLORA_BUILD_EXT={raw!r}: expected 0 (skip the build), 1 (force it: "
                         "a failure is an error) or auto (unset)")
    return mode


def arch_list(raw: Optional[str] = None) -> str:
    """TORCH_CUDA_ARCH_LIST normalised ("8.0 9.0+PTX" -> "8.0;9.0+PTX"), default
    DEFAULT_ARCH_LIST; a ValueError naming the variable for a value nvcc would not take."""
    if raw is None:
        raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    tokens = [t for t in re.split(r"[;,\s]+", raw.strip()) if t]
    if not tokens:
        return DEFAULT_ARCH_LIST
    for t in tokens:
        if not (_ARCH.match(t) or t == "native" or any(t.startswith(n) for n in _NAMED_ARCHS)):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={raw!r}: {t!r} is not a CUDA arch such as 8.0, 9.0a "
                             "or 9.0+PTX (separate them with ';' or spaces)")
    return ";".join(tokens)


def nvcc_home() -> Optional[Path]:
    """The CUDA toolkit folder: CUDA_HOME (or CUDA_PATH) when set (None if it has no
    bin/nvcc), else the folder above the nvcc on PATH, else /usr/local/cuda, whichever
    holds both bin/nvcc and include/cuda_runtime.h (an nvcc wrapper script in
    /usr/local/bin has no toolkit beside it: torch's own guess, /usr/local, lacks the
    headers); None when none does."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return Path(home) if (Path(home) / "bin" / "nvcc").exists() else None
    nvcc = shutil.which("nvcc")
    for cand in ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (cand / "bin" / "nvcc").exists() and (cand / "include" / "cuda_runtime.h").exists():
            return cand
    return None


def no_nvcc_reason() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return f"nvcc not found ({f'CUDA_HOME={home} has no bin/nvcc' if home else 'set CUDA_HOME'})"


def source_digest(csrc) -> str:
    """sha256 over csrc/'s build inputs (names and contents): the key of a build."""
    digest = hashlib.sha256()
    for ext in ("*.cpp", "*.cu", "*.h", "*.cuh"):
        for src in sorted(Path(csrc).glob(ext)):
            digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()
