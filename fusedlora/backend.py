"""Which implementation runs: backend choice, and a record of what ran.

``FUSEDLORA_BACKEND`` (read at every call, so tests and users can switch it):
  auto    CUDA tensors run the measured winner per op and row count (Triton, except the
          tables below: EAGER_WINS, CUDA_WINS, and HOST_WINS for eager decode calls
          outside CUDA-graph capture), CPU tensors the PyTorch reference
  triton  Triton kernels; CPU tensors only with TRITON_INTERPRET=1 (how CI runs them)
  cuda    the CUDA C++ extension of csrc/ (built on first use) where it has a kernel
          (forwards of 1..16 rows without dropout: LoRA, multi-adapter, C3A, sparse);
          Triton for the rest, recorded as such
  torch   the plain-PyTorch path of fusedlora.reference
  eager   plain-PyTorch compositions built on cuBLAS/cuFFT (sparse: W + delta formed,
          then cuBLAS; C3A: cuBLAS plus PEFT's FFT delta up to 16 rows, the unscaled
          circulant through one addmm above; LoRA's forward: F.linear plus two thin
          matmuls; the multi-adapter forward of <= 16 rows without dropout: a gather of
          each row's pool rows plus two bmm), the reference path for the other ops;
          auto picks it for the ops in EAGER_WINS, and for eager decode calls by HOST_WINS
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


@contextlib.contextmanager
def scoped_setting(module_name: str, attr: str, value):
    """``module.attr = value`` for the calls in this scope, then back (process-wide, like
    ``use_backend``): the switches the benchmarks time both sides of."""
    import sys

    module = sys.modules[module_name]
    before = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, before)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv is a constexpr function, ~5 us a call on a small
    CPU (nine a decode call), paid by every eager launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version():
    try:
        import triton
    except Exception:  # pragma: no cover - triton ships with CUDA torch on Linux
        return None
    return triton.__version__


class Choice:
    """A choice among ``names`` read from environment variable ``var`` at every call, with a
    process-wide scoped override (``use``; not per thread; scopes nest)."""

    def __init__(self, var: str, names: tuple, default: str, scope: str):
        self.var, self.names, self.default, self.scope = var, names, default, scope
        self._forced: Optional[str] = None

    def get(self) -> str:
        if self._forced is not None:
            return self._forced
        name = os.environ.get(self.var, self.default).strip().lower() or self.default
        if name not in self.names:
            raise ValueError(f"{self.var} must be one of {self.names}, got {name!r}")
        return name

    @contextlib.contextmanager
    def use(self, name: str):
        if name not in self.names:
            raise ValueError(f"{self.scope}: name must be one of {self.names}, got {name!r}")
        before, self._forced = self._forced, name
        try:
            yield
        finally:
            self._forced = before


_BACKEND = Choice("FUSEDLORA_BACKEND", BACKENDS, "auto", "use_backend")
requested_backend = _BACKEND.get
# Run the calls in a scope on a backend (as FUSEDLORA_BACKEND=name would); the benchmarks
# time each backend this way.
use_backend = _BACKEND.use


# Auto mode's use of the CUDA extension, from GPU measurements: op -> the largest
# row count at which its CUDA kernel beat Triton (bench/results). Ops not listed
# run on Triton. H200, bf16, CUDA-graph replays (bench/results/2026-11-28_h200, the
# extension's two-launch form against Triton's decode pairs): no kernel beat Triton at every
# shape; the closest, LoRA at 1 row 16.0 / 29.8 us against 14.9 / 27.1 us and the BGMV at 1
# row 21.4 / 35.4 us against 21.6 / 35.3 us (4096 x 4096 / 4096 x 11008); at 16 rows the
# FMA GEMV is 2-4x slower (docs/cuda.md). (2026-11-27_h200_2, the five-launch form: BGMV
# won at 1 row.)
CUDA_WINS: dict = {}

# Auto mode's use of the eager compositions, from GPU measurements: op -> the row count
# above which the composition ran faster than the Triton kernels (0: at every row count).
# H200, bf16, 4096 x 4096 (bench/results/2026-11-27_h200, _h200_2): PEFT-style
# compositions beat the fused Triton GEMMs at every shape for C3A (1.1-3.5x at 4096 rows)
# and for sparse above 16 rows (11x at 4096); at 1..16 rows the sparse Triton rows path
# (the base GEMM then each output feature's nonzeros) took 29-39 us against 51-59 us for
# the dense composition (CUDA-graph replays), so sparse.forward keeps Triton there.
# LoRA above 16 rows, from measurements of its parts (the rows themselves not yet timed): the
# fused Triton forward took 259-278 us at 4096 x 4096 x 4096, r 8..64, where F.linear took
# 187-201 (the multi bench's `single` and `base` columns, 2026-11-27_h200_2 and 2026-11-28_h200),
# and fused forward+backward 2.07 ms against the frozen base's 0.39 (2026-11-27_h200). The
# composition adds to F.linear two thin GEMMs and a read and write of y (addmm_): ~25 us at
# the ~4 TB/s the H200 copied a 4096 x 4096 W with; the backward's, cuBLAS products likewise.
# The bench's `lora` rows (`auto` against `fused`) confirm or undo this entry.
# ops with a composition
EAGER_OPS = ("sparse.forward", "sparse.backward", "c3a.forward", "c3a.backward", "lora.forward", "lora.backward",
             "multi.forward")
EAGER_WINS: dict = {"sparse.forward": 16, "sparse.backward": 0, "c3a.forward": 0, "c3a.backward": 0,
                    "lora.forward": 16, "lora.backward": 16}


# Auto mode for eager calls outside CUDA-graph capture, from GPU measurements: op ->
# (the row count up to which, the backend that) took the least wall time per call. At decode
# sizes such a call is bound by the host, so the path with fewer launches wins whatever its
# kernels do in a graph (bench/results/2026-11-27_h200_2, the H200's host, 1..16 rows, bf16):
#   lora.forward  F.linear plus two thin matmuls 84-90 us a call, Triton's two launches
#                 218-469 us (in a graph Triton is the faster: 19.6 against 26.5 us at 1 row)
#   c3a.forward   Triton's one GEMM 105-272 us, the FFT composition 244-530 us (in a graph
#                 EAGER_WINS keeps the FFT form); "triton-fused" is that one launch, not
#                 the two-launch decode pair Triton runs otherwise (each Triton launch cost
#                 that host ~100 us; in a graph the pair is the candidate)
#   multi.forward a gather plus two bmm 116-164 us, the CUDA extension's BGMV 177-293 us,
#                 Triton's 466-633 us; again on 2026-11-28_h200: 102-178 us, 187-374 us and
#                 373-668 us (the extension first until then: its five-launch form's numbers)
# A capture (or torch.compile's CUDA graphs) runs the backend select_backend names; dispatch()
# runs that one too on the first eager call of each signature, so its kernels are compiled,
# loaded and planned before any capture of the same shapes (the driver forbids loading a
# module, and cuFFT making a plan, inside one).
HOST_WINS: dict = {"lora.forward": (16, ("eager",)), "c3a.forward": (16, ("triton-fused",)),
                   "multi.forward": (16, ("eager",))}  # the first one available
_warmed: set = set()  # signatures whose capture-time backend has run once in this process


def _cuda_if_built(op: str, say: bool = True) -> Optional[str]:
    """"cuda" when the extension is loaded, else None, said in the dispatch table (``say``).
    Never a build from here: a decode step would stall on nvcc for a minute; the extension
    serves once built (setup.py, or fusedlora.cuda_ext.load())."""
    from . import cuda_ext

    if cuda_ext.load(build=False) is not None:
        return "cuda"
    if say:
        record(op, "triton", "no-cuda-extension")  # the measured winner is missing: said, not hidden
    return None


def _host_choice(op: str, dtype: torch.dtype) -> Optional[str]:
    """The first of HOST_WINS[op]'s backends that can serve: the extension once built (the
    next choice's record says what ran instead), Triton for 16/32-bit floats."""
    for name in HOST_WINS[op][1]:
        if name == "cuda":
            name = _cuda_if_built(op, say=False)
        elif name.startswith("triton") and dtype not in (torch.float16, torch.bfloat16, torch.float32):
            name = None
        if name is not None:
            return name
    return None


def _eager_gpu_call(device: torch.device) -> bool:
    """A call on the GPU that is not being captured into a CUDA graph."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _signature(op: str, args: tuple) -> tuple:
    """What decides the kernels a call compiles and plans: shapes, strides, dtypes and the
    16-byte alignment of every tensor (Triton specializes on it), the other arguments as given."""
    return (op, *[(a.dtype, a.device, a.shape, a.stride(), a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a
                  for a in args])


def dispatch(op: str, run, x: torch.Tensor, *args, host_ok: bool = True):
    """``run(backend, x, *args)`` on the backend for ``op`` on x's rows: select_backend's, or
    in auto mode an eager GPU call's winner in HOST_WINS (``host_ok``: the call's options allow
    it). Before the first such call of a signature, select_backend's backend runs once (its
    result unused): a later capture of the same shapes then finds its kernels ready."""
    rows = x.shape[0]
    backend = select_backend(x.device, op, rows)
    if not (host_ok and op in HOST_WINS and 0 < rows <= HOST_WINS[op][0] and requested_backend() == "auto"
            and _eager_gpu_call(x.device)):
        return run(backend, x, *args)
    host = _host_choice(op, x.dtype)
    if host is None or host == backend:
        return run(backend, x, *args)
    key = _signature(op, (x,) + args)
    if key not in _warmed:
        run(backend, x, *args)
        _warmed.add(key)
    return run(host, x, *args)


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
                return _cuda_if_built(op) or "triton"
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
    from . import cuda_ext, launch

    cuda_ok = torch.cuda.is_available()

    def said(choice):
        try:
            return choice()
        except ValueError as e:
            return f"invalid ({e})"

    return {
        "requested": said(requested_backend),
        "cuda_gemv": said(cuda_ext.requested_gemv),
        "decode_pairs": launch.DECODE_PAIR,  # launch.use_decode_pair: 1..16-row forwards in two launches
        "torch": torch.__version__,
        "triton": triton_version(),
        "triton_interpret": interpreting(),
        "cuda_available": cuda_ok,
        "device": torch.cuda.get_device_name() if cuda_ok else "cpu",
        "cuda_extension": cuda_ext.status(),
        "dispatch": dict(_dispatch),
    }
