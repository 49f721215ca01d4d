"""Shared machinery of the microbenchmarks: cases, timing, rooflines, reports.

An adapter path (bench/lora.py, bench/c3a.py, ...) only describes its
cases: the shape, how to draw one random input set, and for each
implementation a ``setup(inputs) -> thunk``. Everything about *how* a thunk
is timed and reported lives here, so every path is measured the same way.
See docs/benchmarks.md for the method.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fusedlora

from .report import best_ms  # torch-free, so report.py also runs on its own

REPO_ROOT = Path(__file__).resolve().parent.parent
# Input sets smaller than this could sit (partly) in L2 across repeats; they
# are rotated so that no repeat reads what the previous one left in cache.
ROTATE_BELOW_BYTES = 256 * 2**20
N_ROTATING_SETS = 4


class Skip(Exception):
    """Raised by an implementation's setup when it cannot run here (e.g. peft missing)."""


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    smoke: bool = False


@dataclass
class Case:
    """One row of a report: a shape and variant, timed for several implementations.

    ``impls`` maps a name to ``setup(inputs) -> thunk``; setup runs once per
    input set, outside the timing, so building modules or compiling is never
    timed. ``work`` maps an implementation to its (flops, minimal bytes); the
    ``"*"`` entry covers implementations that compute the same thing as ``ref``.
    """

    path: str
    variant: str
    shape: Dict[str, int]
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[], Dict[str, Any]]
    impls: Dict[str, Callable[[Dict[str, Any]], Callable[[], Any]]]
    work: Dict[str, Tuple[float, float]]
    ref: str = "fused"
    roof_impls: Tuple[str, ...] = ("fused",)
    # Extra keyword arguments of time_thunks for this case (e.g. a longer
    # rep_ms for slow CPU rows); None: the defaults.
    timing: Optional[Dict[str, float]] = None
    # Also time CUDA-graph replays (see time_graph); None: when the case is
    # decode-sized (its M or T at most DECODE_ROWS), where launch gaps would
    # otherwise be measured instead of the kernels. A thunk with a ``no_graph``
    # attribute (the reason) is known not to be capturable.
    graph: Optional[bool] = None
    # Cross-check before timing (METHOD.md, "Correct first"): the first name is the reference
    # (the simplest implementation), each other name must compute the same function; one whose
    # output differs by more than CHECK_RTOL (relative, on input set 0) is not timed. Empty: no
    # check (implementations that compute different things, or that only mutate state).
    check: Tuple[str, ...] = ()

    def work_of(self, impl: str) -> Tuple[float, float]:
        return self.work.get(impl, self.work["*"])

    def timed_by_graph(self) -> bool:
        if self.device.type != "cuda":
            return False
        if self.graph is not None:
            return self.graph
        rows = self.shape.get("M", self.shape.get("T"))
        return rows is not None and rows <= DECODE_ROWS


# ------------------------------------------------------------------ roofline
def matmul_flops(*mnk: Tuple[int, int, int]) -> float:
    return float(sum(2 * m * n * k for m, n, k in mnk))


def numel_bytes(elem: int, *shapes: Sequence[int]) -> float:
    return float(elem * sum(math.prod(s) for s in shapes))


def gemm_adapter_flops(M: int, K: int, N: int, r: int = 0) -> float:
    """y = x W^T (+ b) + (x A^T) B^T: the base GEMM plus the two thin ones."""
    return matmul_flops((M, N, K), (M, r, K), (M, N, r))


def gemm_adapter_bytes(M: int, K: int, N: int, r: int = 0, elem: int = 2, bias: bool = True) -> float:
    """Each input (x, W, b, A, B) read once, y written once: the least any kernel moves."""
    return numel_bytes(elem, (M, K), (N, K), (N if bias else 0,), (r, K), (N, r), (M, N))


def roofline(flops: float, nbytes: float, ms: float, ceilings: dict) -> Tuple[float, str]:
    """Percent of the roofline time max(flops/peak, bytes/bandwidth), and which bound it is.

    For decode shapes the bytes term dominates (bandwidth-based), for large M
    the flops term (FLOP-based); in between, whichever is the real limit.
    """
    t_flop = flops / ceilings["flops_per_s"]
    t_bw = nbytes / ceilings["bytes_per_s"]
    return 100.0 * max(t_flop, t_bw) / (ms * 1e-3), ("bw" if t_bw >= t_flop else "flop")


# ------------------------------------------------------- helpers for paths
def random_maker(device, dtype):
    """rnd(*shape, std=1.0): normal samples drawn in fp32, scaled (so bf16 sums
    stay O(1)) and cast: never zeros, which would time faster than real data."""
    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)
    return rnd


def frozen_linear(W: torch.Tensor, b: Optional[torch.Tensor] = None) -> nn.Linear:
    """An nn.Linear whose frozen parameters are W and b themselves (no copy, no
    init): the base layer that PEFT's and fusedlora's modules wrap here."""
    N, K = W.shape
    linear = nn.Linear(K, N, bias=b is not None, device="meta")
    linear.weight = nn.Parameter(W, requires_grad=False)
    if b is not None:
        linear.bias = nn.Parameter(b, requires_grad=False)
    return linear


def elem_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def grad_thunk(forward: Callable[[], torch.Tensor], inputs: Dict[str, Any],
               wrt: Sequence[torch.Tensor]) -> Callable[[], Any]:
    """Forward only (no ``gy`` in inputs), or forward and backward for exactly
    the tensors of ``wrt`` that require grad, against ``inputs["gy"]``.

    torch.autograd.grad, not .backward(): no .grad accumulation kernels are timed."""
    if "gy" not in inputs:
        return forward
    wrt = [t for t in wrt if t.requires_grad]
    gy = inputs["gy"]
    return lambda: torch.autograd.grad(forward(), wrt, gy)


def base_thunk(inputs: Dict[str, Any]) -> Callable[[], Any]:
    """The base layer alone, F.linear(x, W, b) (and its x gradient under fwd+bwd): the
    floor every adapter path is measured from."""
    return grad_thunk(lambda: F.linear(inputs["x"], inputs["W"], inputs["b"]), inputs, [inputs["x"]])


def adapter_case(path: str, variant: str, shape: Dict[str, int], opts: "Options", make_inputs, impls: dict,
                 work: Tuple[Tuple[float, float], Tuple[float, float]]) -> "Case":
    """A row of a single-adapter path (LoRA, C3A, sparse): ``work`` = (the fused op's,
    the base layer's) (flops, bytes); ratios against ``fused``, roofline of fused and base.
    Every implementation but ``base`` is checked against ``eager`` before it is timed."""
    return Case(path=path, variant=variant, shape=shape, dtype=opts.dtype, device=opts.device,
                make_inputs=make_inputs, impls=impls, work={"*": work[0], "base": work[1]}, ref="fused",
                roof_impls=("fused", "base"), check=("eager",) + tuple(i for i in impls if i not in ("eager", "base")))


def on_backend(name: str, thunk: Callable[[], Any]) -> Callable[[], Any]:
    """``thunk`` run under fusedlora.use_backend(name), its backward included."""
    def run():
        with fusedlora.use_backend(name):
            return thunk()
    return run


def compiled(fn: Callable, make_thunk: Callable[[Callable, Dict[str, Any]], Callable[[], Any]]):
    """Setup of a ``torch.compile(fn, dynamic=False)`` implementation, compiled
    once per case: ``make_thunk(compiled_fn, inputs)`` builds the thunk.

    Dynamo is reset first so each case gets a fresh static graph instead of
    piling up cache entries (whose guards would be checked on every call) or
    hitting the recompile limit and silently running eager."""
    state: Dict[str, Callable] = {}

    def setup(inputs):
        if "fn" not in state:
            torch._dynamo.reset()
            state["fn"] = torch.compile(fn, dynamic=False)
        return make_thunk(state["fn"], inputs)

    return setup


# -------------------------------------------------------------------- timing
def _summary(times_ms: List[float]) -> dict:
    s = sorted(times_ms)

    def q(p):  # linear interpolation, as torch.quantile
        i = p * (len(s) - 1)
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return {"median_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8),
            "min_ms": s[0], "max_ms": s[-1], "samples": len(s)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# At least this many timed calls per median on CUDA (METHOD.md: "repeat many times").
MIN_SAMPLES = 10


def time_thunks(thunks: Sequence[Callable[[], Any]], device: torch.device,
                warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median (and spread) of one call, cycling through ``thunks`` (one per input set).

    Each thunk is called once first, outside the timing, so JIT, autotuning
    and compilation are not timed and their errors surface here.
    """
    for t in thunks:
        t()
    _sync(device)
    it = itertools.cycle(thunks)

    def step():
        return next(it)()

    if device.type == "cuda":
        # do_bench: CUDA events around each call, L2 flushed before each one.
        from triton.testing import do_bench

        times = list(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
        if len(times) < MIN_SAMPLES:  # slow calls: do_bench sizes its repeats to rep_ms, maybe one
            more = MIN_SAMPLES * max(times) * 1.5
            times += do_bench(step, warmup=0, rep=more, return_mode="all")
        return _summary(times)
    # CPU: wall clock per call; a short budget keeps the smoke run quick.
    times, deadline = [], time.perf_counter() + rep_ms * 1e-3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


GRAPH_CALLS = 16
# Rows up to this many are decode-sized: their cases are also timed from graph replays.
DECODE_ROWS = 64


def time_graph(thunks: Sequence[Callable[[], Any]], device: torch.device, rep_ms: float = 100) -> dict:
    """Median time of one call from replays of a CUDA graph that holds GRAPH_CALLS
    calls cycling through ``thunks``: the device time of the work without the
    host's launch gaps, as a serving engine that captures its decode step sees
    it (METHOD.md: many small launches). The thunks must have run once already
    (compiled, autotuned) and must not synchronise with the host.

    L2 stays honest: do_bench flushes it before each replay, and within one the
    calls rotate over the input sets, each larger than L2 / (sets - 1) for
    decode shapes."""
    from triton.testing import do_bench

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for t in thunks:
            t()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    calls = list(itertools.islice(itertools.cycle(thunks), GRAPH_CALLS))
    with torch.cuda.graph(graph):
        outs = [t() for t in calls]  # kept alive: the graph's outputs live in its pool
    times = list(do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="all"))
    if len(times) < MIN_SAMPLES:
        times += do_bench(graph.replay, warmup=0, rep=MIN_SAMPLES * max(times) * 1.5, return_mode="all")
    del outs, graph
    return _summary([t / len(calls) for t in times])


LOOP_CALLS = 200


def time_loop(thunks: Sequence[Callable[[], Any]], device: torch.device, calls: int = LOOP_CALLS) -> float:
    """Milliseconds per call of ``calls`` back-to-back eager calls (cycling the input sets),
    events around the whole loop, no L2 flush between calls: what an eager decode loop costs.
    do_bench's per-call flush (a 256 MB memset, ~60-85 us on an H100/H200) lets the host queue
    the next call meanwhile, so a host-bound call's medians hide up to that much launch time."""
    for t in thunks:
        t()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for t in itertools.islice(itertools.cycle(thunks), calls):
        t()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls


def measure_ceilings(device: torch.device, dtype: torch.dtype, small: bool = False,
                     bandwidth_of: Optional[dict] = None) -> dict:
    """The two roofline ceilings, measured once per run on this device:
    bandwidth from a large device-to-device copy, FLOP/s from a large matmul in
    ``dtype`` (the peak of that dtype: a float32 row must not be held to the bf16
    peak). ``small`` (smoke runs): tiny sizes that only check the code.
    ``bandwidth_of``: the ceilings of another dtype of this run, whose copy is reused
    (bandwidth does not depend on the dtype; one measurement keeps the rows comparable)."""
    if small:
        copy_bytes, n = 16 * 2**20, 256
    elif device.type == "cuda":
        copy_bytes, n = 2**30, 8192
    else:  # CPU: past the last-level cache, and a matmul a few cores finish in a fraction of a second
        copy_bytes, n = 256 * 2**20, 2048
    if bandwidth_of is None:
        src = torch.randn(copy_bytes // 4, device=device)  # float32 elements
        dst = torch.empty_like(src)
        copy_t = time_thunks([lambda: dst.copy_(src)], device)
        del src, dst
        moved = 2 * copy_bytes  # read + write
        copy = {"bytes_moved": moved, **copy_t}
        bytes_per_s = moved / (copy_t[CEILING_QUANTILE] * 1e-3)
    else:
        copy, bytes_per_s = bandwidth_of["copy"], bandwidth_of["bytes_per_s"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_t = time_thunks([lambda: torch.matmul(a, b)], device)
    del a, b
    return {"bytes_per_s": bytes_per_s,
            "flops_per_s": 2 * n**3 / (mm_t[CEILING_QUANTILE] * 1e-3),
            "quantile": CEILING_QUANTILE,
            "copy": copy,
            "matmul": {"n": n, "dtype": str(dtype).replace("torch.", ""), **mm_t}}


# A ceiling is what the device can reach, so its fast mode, not its median: the H200's 8192^3
# bf16 matmul times were bimodal in every run (p20 ~ min 1.38-1.46 ms, median ~ p80 1.54-1.60 ms,
# a clock or power state), and a median ceiling put F.linear at 101-114 % of the roof. p20, not
# the min: one lucky sample is not a rate the device holds.
CEILING_QUANTILE = "p20_ms"


# ---------------------------------------------------------------- run a case
def _tensors(inputs: Dict[str, Any]) -> List[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor)]


def _input_sets(case: Case) -> List[Dict[str, Any]]:
    first = case.make_inputs()
    for name, t in first.items():
        # Zeros make some kernels (and the hardware) look faster than real data.
        if isinstance(t, torch.Tensor) and t.numel() and not bool(t.detach().abs().amax() > 0):
            raise ValueError(f"{case.path}/{case.variant}: input {name!r} is all zeros; draw random inputs")
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(first))
    n = N_ROTATING_SETS if nbytes < ROTATE_BELOW_BYTES else 1
    return [first] + [case.make_inputs() for _ in range(n - 1)]


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# Largest relative error ||out - ref|| / ||ref|| between two implementations of one row
# (METHOD.md: float32 far under 1e-3, tf32 near 3e-4, bf16 operands 1e-3..1e-2 against an
# exact reference; two implementations each that far off can differ by twice as much).
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _outputs(out: Any) -> Optional[List[torch.Tensor]]:
    """The tensors a thunk returned (one, or the gradients of a tuple), detached; None: nothing to compare."""
    if isinstance(out, torch.Tensor):
        return [out.detach().clone()]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return [t.detach().clone() for t in out]
    return None


def rel_err(out: List[torch.Tensor], ref: List[torch.Tensor]) -> float:
    """max over the output tensors of ||out - ref|| / ||ref|| (float32 norms); inf for a shape or
    count mismatch, NaN when either side has NaN (NaN never passes a check)."""
    if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
        return math.inf
    worst = 0.0
    for o, r in zip(out, ref):
        num = torch.linalg.vector_norm(o.float() - r.float()).item()
        den = torch.linalg.vector_norm(r.float()).item()
        e = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        if not math.isfinite(e) or not math.isfinite(num):
            return math.nan if (math.isnan(num) or math.isnan(den)) else math.inf
        worst = max(worst, e)
    return worst


def run_case(case: Case, ceilings: dict) -> List[dict]:
    """Time every implementation of ``case``; one JSON-ready row each. A failing
    implementation is recorded with its reason and the run goes on. The
    implementations of ``case.check`` are first compared, on input set 0, with the
    first of them that ran; one that computes something else is recorded as
    ``mismatch`` and not timed, unless its thunk names the discrepancy as a known bug of
    that peer (``known_mismatch``, a reason): then it is timed and the reason recorded."""
    sets = _input_sets(case)
    rows: Dict[str, dict] = {}
    check_ref: Optional[Tuple[str, List[torch.Tensor]]] = None
    order = list(case.impls)
    if case.check and case.check[0] in order:  # the reference first: each other one is checked as it runs
        order.remove(case.check[0])
        order.insert(0, case.check[0])
    tol = CHECK_RTOL.get(case.dtype, 2e-2)
    set_bytes = sum(t.numel() * t.element_size() for t in _tensors(sets[0]))
    for impl in order:
        setup = case.impls[impl]
        flops, nbytes = case.work_of(impl)
        row = {"path": case.path, "variant": case.variant, "shape": dict(case.shape),
               "dtype": str(case.dtype).replace("torch.", ""), "device": str(case.device), "impl": impl,
               "input_sets": len(sets), "flops": flops, "bytes": nbytes, "status": "ok", "reason": None,
               "ref": case.ref, "roof_impls": list(case.roof_impls)}
        fusedlora.reset_dispatch()
        thunks = None
        calls = 1
        try:
            thunks = [setup(s) for s in sets]
            calls = getattr(thunks[0], "calls", 1)  # a thunk that makes several calls: times per call
            if impl in case.check:
                out = _outputs(thunks[0]())  # untimed: also the first (compiling, autotuning) call
                if out is not None and check_ref is None:
                    check_ref = (impl, out)
                    row["check"] = {"reference": True}
                elif out is not None:
                    err = rel_err(out, check_ref[1])
                    row["check"] = {"vs": check_ref[0], "rel_err": err, "tol": tol}
                    known = getattr(thunks[0], "known_mismatch", None)  # a peer's own bug, timed anyway
                    if not err <= tol and known:
                        row["check"]["known_mismatch"] = known
                        row["reason"] = f"rel. error {err:.3g} against {check_ref[0]}, timed anyway: {known}"
                    elif not err <= tol:
                        row.update(status="mismatch", reason=f"rel. error {err:.3g} against {check_ref[0]} "
                                                              f"(tolerance {tol:g}): not timed")
                del out
            if row["status"] == "ok":
                row.update(time_thunks(thunks, case.device, **(case.timing or {})))
            if row["status"] == "ok" and case.timed_by_graph():
                try:
                    row["loop_ms"] = time_loop(thunks, case.device)  # eager, back to back: host cost included
                except Exception as e:  # an extra number: its failure must not lose the row
                    row["loop_error"] = _reason(e)
                    torch.cuda.synchronize(case.device)
                why_not = getattr(thunks[0], "no_graph", None)  # known to sync with the host
                if why_not is None:
                    try:
                        g = time_graph(thunks, case.device)
                        row["graph_ms"] = g["median_ms"]
                        row["graph"] = g  # per call: quantiles and sample count of the replays
                        l2 = getattr(torch.cuda.get_device_properties(case.device), "L2_cache_size", 0)
                        if (len(sets) - 1) * set_bytes <= l2:  # time_graph's rotation assumes more
                            row["graph_warning"] = (f"{len(sets)} input sets of {set_bytes} B: a set may still "
                                                    f"be in L2 ({l2} B) when a replay reuses it")
                    except Exception as e:  # a host sync inside: events time only
                        why_not = _reason(e)
                        torch.cuda.synchronize(case.device)
                if why_not is not None:
                    row["graph_error"] = why_not
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # recorded, not fatal: one broken baseline must not lose the run
            row.update(status="error", reason=_reason(e))
        finally:
            del thunks
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
        row["dispatch"] = sorted(fusedlora.backend_info()["dispatch"])
        if row["status"] == "ok" and calls > 1:
            row["calls_per_thunk"] = calls
            for key in ("median_ms", "p20_ms", "p80_ms", "min_ms", "max_ms", "graph_ms", "loop_ms"):
                if row.get(key) is not None:
                    row[key] /= calls
        if row["status"] == "ok":
            ms = row.get("graph_ms") or row["median_ms"]  # the device time where a graph measured it
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            row["gbps"] = nbytes / (ms * 1e-3) / 1e9
            row["roofline_pct"], row["bound"] = roofline(flops, nbytes, ms, ceilings)
            row["ceilings_dtype"] = ceilings["matmul"]["dtype"]  # whose FLOP/s peak the roofline used
        rows[impl] = row
    return [rows[i] for i in case.impls]  # the case's order, not the check's


# --------------------------------------------------------------- environment
def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    info = fusedlora.backend_info()
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": info["triton"],
           "python": platform.python_version(), "fusedlora": getattr(fusedlora, "__version__", None),
           "fusedlora_backend": info["requested"], "triton_interpret": info["triton_interpret"],
           "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None, "argv": sys.argv}
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    env["peft"] = _version("peft")
    # Settings that change what runs: fusedlora's environment knobs (autotuning, GEMV, ...), TF32.
    env["fusedlora_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("FUSEDLORA_")}
    env["allow_tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = {"capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 1),
                      "l2_bytes": getattr(p, "L2_cache_size", None)}
        env["gpu_state"] = _gpu_state(p)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


_GPU_QUERY = ("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,clocks_event_reasons.active,persistence_mode,compute_mode,mig.mode.current")


def _gpu_state(p) -> Optional[dict]:
    """The card as found (METHOD.md: measure it as you find it, say so if its state looks wrong):
    driver, current and maximum clocks, power, temperature, throttle reasons. A read-only
    ``nvidia-smi --query-gpu``; None where it is missing or fails."""
    uuid = str(getattr(p, "uuid", "") or "")
    target = ["--id=" + (uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")] if uuid else []
    for args in (target, []) if target else ([],):
        try:
            out = subprocess.run(["nvidia-smi", *args, f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and out.stdout.strip():
            keys = _GPU_QUERY.split(",")
            gpus = [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in out.stdout.strip().splitlines()]
            return gpus[0] if len(gpus) == 1 else {"all_gpus": gpus}
    return None


# ------------------------------------------------------------------- reports
def _us(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    us = ms * 1e3
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def _rate(per_s: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if per_s >= scale:
            return f"{per_s / scale:,.1f} {prefix}{unit}"
    return f"{per_s:,.0f} {unit}"


def markdown(rows: List[dict], env: dict, ceilings: dict, title: str = "fusedlora microbenchmarks",
             smoke: bool = True) -> str:
    """Tables per (path, variant): medians in µs, ratios X/ref (> 1: ref is
    faster than X), and percent of roofline of the implementations in roof_impls."""
    lines = [f"# {title}", "",
             f"{env['date']} · {env['device']} · torch {env['torch']} · CUDA {env['cuda']} · "
             f"triton {env['triton']} · commit {(env['git_commit'] or '?')[:10]}{'+dirty' if env['git_dirty'] else ''}",
             "",
             f"Ceilings measured this run: {_rate(ceilings['bytes_per_s'], 'B/s')} (copy), "
             f"{_rate(ceilings['flops_per_s'], 'FLOP/s')} ({ceilings['matmul']['dtype']} matmul "
             f"{ceilings['matmul']['n']}³). Times are medians in µs; X/ref is X's time over ref's "
             "(> 1: ref is faster); %roof is the roofline time over the measured time. Where a "
             "'graph µs' column is shown (decode-sized rows), ratios and %roof use the CUDA-graph "
             "replay time, the device time without launch gaps; * marks a ratio of a graph time "
             "to an eager one (that implementation cannot be captured). Before timing, each "
             "implementation's output was compared with the row's reference implementation "
             "(relative error in the JSON, `check`); one that disagreed is listed under 'Not timed'.", ""]
    for name, other in ceilings.get("other_dtypes", {}).items():
        lines[-1:-1] = [f"{name} rows: {_rate(other['flops_per_s'], 'FLOP/s')} ({name} matmul "
                        f"{other['matmul']['n']}³), the same copy bandwidth.", ""]
    if env["device"].startswith("cpu"):
        lines += ["CPU wall-clock timings: a check of the harness, not a measurement." if smoke else
                  f"CPU wall-clock timings (median of time.perf_counter per call, "
                  f"{env.get('cpu_threads', '?')} torch threads).", ""]
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["path"], r["variant"], r["dtype"]), []).append(r)
    notes: Dict[str, None] = {}
    caveats: Dict[str, None] = {}
    for (path, variant, _), grp in groups.items():
        ref, roof_impls = grp[0].get("ref", "fused"), grp[0].get("roof_impls", ("fused",))
        impls = list(dict.fromkeys(r["impl"] for r in grp))
        others = [i for i in impls if i != ref]
        keys = list(grp[0]["shape"])
        graphed = [i for i in impls if any("graph_ms" in r for r in grp if r["impl"] == i)]
        head = (keys + [f"{i} µs" for i in impls] + [f"{i} graph µs" for i in graphed]
                + [f"{i}/{ref}" for i in others] + [f"{i} %roof" for i in roof_impls])
        lines += [f"## {path} · {variant} · {grp[0]['dtype']}", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by_shape: Dict[tuple, Dict[str, dict]] = {}
        for r in grp:
            by_shape.setdefault(tuple(r["shape"].values()), {})[r["impl"]] = r
            if r["status"] != "ok":
                notes[f"{path} {variant} {r['impl']}: {r['status']}: {r['reason']}"] = None
            elif r.get("reason"):  # timed, with a caveat (a known mismatch of a peer)
                caveats[f"{path} {variant} {r['impl']}: {r['reason']}"] = None
        for shape, by_impl in by_shape.items():
            ms = {i: by_impl[i].get("median_ms") if i in by_impl else None for i in impls}
            cells = [str(v) for v in shape] + [_us(ms[i]) for i in impls]
            cells += [_us(by_impl.get(i, {}).get("graph_ms")) for i in graphed]
            for i in others:
                a, b = by_impl.get(i, {}), by_impl.get(ref, {})
                if a.get("median_ms") and b.get("median_ms"):
                    mixed = ("graph_ms" in a) != ("graph_ms" in b)
                    cells.append(f"{best_ms(a) / best_ms(b):.3g}{'*' if mixed else ''}")
                else:
                    cells.append("—")
            for i in roof_impls:
                r = by_impl.get(i, {})
                cells.append(f"{r['roofline_pct']:.0f}% {r['bound']}" if r.get("roofline_pct") is not None else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    dispatch = sorted({d for r in rows for d in r.get("dispatch", [])})
    lines.append(f"fusedlora dispatch (op:backend:variant): {', '.join(dispatch) or 'none'}")
    if caveats:
        lines += ["", "Timed, but not equal to the reference:"] + [f"- {n}" for n in caveats]
    if notes:
        lines += ["", "Not timed:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "device"


def result_stem(env: dict, tag: Optional[str] = None) -> str:
    """``<date>_<device>_torch<v>_triton<v>[_<tag>]``: the file name says where and with what it ran."""
    stamp = env["date"].replace(":", "").replace("+0000", "Z")
    parts = [stamp, _slug(env["device"]), "torch" + _slug(str(env["torch"])), "triton" + _slug(str(env["triton"]))]
    return "_".join(parts + ([_slug(tag)] if tag else []))


def write_results(out_dir: Path, env: dict, ceilings: dict, options: dict, rows: List[dict], md: str,
                  tag: Optional[str] = None) -> List[Path]:
    """``<stem>.json`` (every raw number) and ``<stem>.md`` (the tables) under out_dir; see result_stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(env, tag)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    doc = {"env": env, "options": options, "ceilings": ceilings, "rows": clean}
    json_path, md_path = Path(f"{stem}.json"), Path(f"{stem}.md")
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md_path.write_text(md)
    return [json_path, md_path]
