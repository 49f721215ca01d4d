"""Decode rows: the CUDA C++ kernels of csrc/ against the Triton path (issue 5).

One FusedLinear per case (inference), timed on the same random input sets:
  cuda    the layer's forward under fusedlora.use_backend("cuda"): csrc/ serves 1..16
          rows; above that the extension has no kernel and Triton runs (the
          dispatch list of the report says which ran); its GEMV on CUDA cores
  cuda-mma  the same with the tensor-core GEMV (cuda_ext.use_gemv("mma"); fp16/bf16)
  triton  the same forward under use_backend("triton"): the two-launch decode pairs
          (LoRA, multi, C3A, sparse) where they serve
  triton-splitk  the same with the pairs off (launch.use_decode_pair(False)): the split-K
          plan's five GPU operations, the pairs' A/B until a GPU run settles the default
  auto    the same forward under fusedlora's default dispatch
  base    F.linear(x, W, b) alone: reading W is the floor of every row here
  eager   the adapter in plain PyTorch after F.linear (LoRA: two thin matmuls;
          multi: the gather + bmm baseline; C3A: PEFT's FFT algorithm; sparse:
          PEFT's SHiRA, W cloned plus the scattered values, then F.linear)
  cublas-rows  sparse only, a candidate for the rows path (not a fusedlora path yet):
          F.linear (cuBLAS, 56% of the HBM roof where Triton's decode GEMM reached 41%)
          rounded to x's dtype, then sparse_rows_add_kernel adds each output feature's
          nonzeros in float32 and rounds again
Variants: "lora r16"; "multi r16" (M rows, each its own adapter out of a pool of
64; M = 64 is the issue's multi-adapter goal); "c3a b64" and "c3a b16" (the decode pair's
delta at small blocks); "sparse 1%".

At these sizes a kernel takes microseconds, so every case is also timed from
CUDA-graph replays (harness.time_graph), the device time a serving engine that
captures its decode step sees; ratios and %roof use it. Bytes: x, W, b and y
once, plus the adapter data the rows read (for multi, the distinct adapters).
``summary`` turns the graph times into the table of fusedlora.backend.CUDA_WINS (one per
GEMV of the extension), and the eager times into the table backend.HOST_WINS rests on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fusedlora
from fusedlora import FusedLinear, cuda_ext, launch, reference
from fusedlora.sparse import random_indices

from .harness import frozen_linear, Case, Options, Skip, best_ms, elem_size, matmul_flops, numel_bytes, random_maker

PATH = "decode"
RANK, POOL, BLOCK, DENSITY = 16, 64, 64, 0.01
SCALING = 2.0
# variant -> the op name that backend.CUDA_WINS is keyed by
OPS = {"lora r16": "lora.forward", "multi r16": "multi.forward", "c3a b64": "c3a.forward", "c3a b16": "c3a.forward",
       "sparse 1%": "sparse.forward"}


def _block(variant: str) -> int:
    return 16 if variant == "c3a b16" else BLOCK


def shapes(opts: Options):
    if opts.smoke:
        return [(v, dict(M=m, K=64, N=64)) for v in OPS for m in (1, 16)]
    Ms = (1, 4, 16) if opts.quick else (1, 2, 4, 8, 16)
    out = []
    for v in OPS:
        for K, N in ((4096, 4096), (4096, 11008)):
            for m in Ms + ((64,) if v == "multi r16" else ()):
                out.append((v, dict(M=m, K=K, N=N)))
    return out


def _adapter_bytes(variant: str, s: dict, elem: int) -> float:
    M, K, N = s["M"], s["K"], s["N"]
    if variant == "lora r16":
        return float(elem * RANK * (K + N))
    if variant == "multi r16":
        return float(elem * min(M, POOL) * RANK * (K + N) + 8 * M)  # distinct adapters, and the ids
    if variant.startswith("c3a"):
        return float(4 * N * K // _block(variant))  # the fp32 kernel (N/b, K/b, b)
    return float(round(DENSITY * N * K) * (elem + 4))  # values and their column indices


def work(variant: str, s: dict, elem: int):
    M, K, N = s["M"], s["K"], s["N"]
    base = (matmul_flops((M, N, K)), numel_bytes(elem, (M, K), (N, K), (N,), (M, N)))
    return (base[0], base[1] + _adapter_bytes(variant, s, elem)), base


def _layer(i, variant: str) -> FusedLinear:
    W = i["W"]
    N, K = W.shape
    layer = FusedLinear.from_linear(frozen_linear(W, i["b"])).eval()
    rnd = random_maker(W.device, W.dtype)
    if variant in ("lora r16", "multi r16"):
        for a in range(1 if variant == "lora r16" else POOL):
            name = f"decode_{a}"
            layer.add_lora(name, r=RANK, lora_alpha=SCALING * RANK)
            layer.lora_A[name] = nn.Parameter(rnd(RANK, K, std=K ** -0.5), requires_grad=False)
            layer.lora_B[name] = nn.Parameter(rnd(N, RANK, std=RANK ** -0.5), requires_grad=False)
        layer.set_adapter("decode_0")
    elif variant.startswith("c3a"):
        layer.add_c3a("decode_c3a", block_size=_block(variant), init_weights="gaussian")
        with torch.no_grad():  # as in bench/c3a.py: a delta as large as x W^T, which the cross-check can see
            layer.c3a_kernel["decode_c3a"].mul_(K ** 0.5)
        layer.set_adapter("decode_c3a")
    else:
        idx = random_indices((N, K), density=DENSITY, seed=int(i["seed"]), device=W.device)
        layer.add_sparse("decode_sparse", idx, values=rnd(idx.shape[1], std=0.01), scaling=1.0)
        layer.set_adapter("decode_sparse")
    return layer


def _inputs(variant: str, s: dict, device, dtype, seed: int):
    M, K, N = s["M"], s["K"], s["N"]
    rnd = random_maker(device, dtype)
    i = {"x": rnd(M, K), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1), "seed": seed}
    i["layer"] = _layer(i, variant)
    if variant == "multi r16":
        layer = i["layer"]
        # in a dict: an id tensor may be all zeros, which the harness refuses for data tensors
        i["route"] = {"ids": torch.tensor([layer.adapter_id(f"decode_{m % POOL}") for m in range(M)], device=device)}
    return i


def _forward(backend: str, gemv: str = "fma", decode_pair: bool = True):
    def setup(i):
        device = i["x"].device
        if backend == "cuda" and device.type != "cuda":
            raise Skip("the CUDA extension needs a CUDA device")
        if backend == "triton" and device.type != "cuda" and not fusedlora.backend.interpreting():
            raise Skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        layer, x = i["layer"], i["x"]
        kw = {"adapter_ids": i["route"]["ids"], "validate": False} if "route" in i else {}

        def run():
            with torch.no_grad(), fusedlora.use_backend(backend), cuda_ext.use_gemv(gemv), \
                    launch.use_decode_pair(decode_pair):
                return layer(x, **kw)
        return run
    return setup


def _base(i):
    return lambda: F.linear(i["x"], i["W"], i["b"])


def _eager(i):
    # the layer's parameters require grad: like the other columns (inference), without a graph
    return torch.no_grad()(_eager_call(i))


def _eager_call(i):
    layer, x, W, b = i["layer"], i["x"], i["W"], i["b"]
    if "route" in i:  # gather + bmm over the rows' own adapters
        names = [f"decode_{a}" for a in range(POOL)]
        A = torch.stack([layer.lora_A[n] for n in names])             # (POOL, r, K)
        BT = torch.stack([layer.lora_B[n].t() for n in names])        # (POOL, r, N)
        rows = (torch.arange(x.shape[0], device=x.device) % POOL)
        return lambda: F.linear(x, W, b) + SCALING * torch.bmm(
            torch.bmm(x[:, None, :], A[rows].transpose(1, 2)), BT[rows])[:, 0]
    if layer.lora_A:
        A, B = layer.lora_A["decode_0"], layer.lora_B["decode_0"]
        return lambda: F.linear(x, W, b) + SCALING * F.linear(F.linear(x, A), B)
    if layer.c3a_kernel:
        kernel = layer.c3a_kernel["decode_c3a"]
        return lambda: F.linear(x, W, b) + reference.c3a_fft_delta(x, kernel).to(x.dtype)
    idx, val = layer.sparse_indices["decode_sparse"], layer.sparse_values["decode_sparse"]
    return lambda: F.linear(x, W.clone().index_put_((idx[0], idx[1]), val, accumulate=True), b)


def _cublas_rows(i):
    layer, x, W, b = i["layer"], i["x"], i["W"], i["b"]
    if not layer.sparse_values:
        raise Skip("sparse rows only")
    if x.device.type != "cuda" and not fusedlora.backend.interpreting():
        raise Skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    import triton

    from fusedlora.kernels.sparse import sparse_rows_add_kernel
    from fusedlora.sparse import _row_csr

    M, N = x.shape[0], W.shape[0]
    _, rows, cols, perm = layer._layout("decode_sparse").tensors()
    row_ptr, col, order = _row_csr(rows, cols, perm, N)
    vals = layer.sparse_values["decode_sparse"].detach().contiguous()
    scaling = float(layer.sparse_scaling["decode_sparse"])

    def run():
        y = F.linear(x, W, b).float()
        sparse_rows_add_kernel[(triton.cdiv(N, 32),)](
            y, x, row_ptr, col, vals, order, M, N, y.stride(0), y.stride(1), x.stride(0), x.stride(1), scaling,
            BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=32, BLOCK_E=16)
        return y.to(x.dtype)
    return run


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    seeds = iter(range(10**9))
    for variant, s in shapes(opts):
        adapter, base = work(variant, s, elem)
        yield Case(path=PATH, variant=variant, shape=s, dtype=opts.dtype, device=opts.device,
                   make_inputs=lambda v=variant, s=s: _inputs(v, s, opts.device, opts.dtype, next(seeds)),
                   impls={"cuda": _forward("cuda"), "cuda-mma": _forward("cuda", "mma"),
                          "triton": _forward("triton"), "triton-splitk": _forward("triton", decode_pair=False),
                          "auto": _forward("auto"),
                          "base": _base, "eager": _eager,
                          "cublas-rows": _cublas_rows},
                   work={"*": adapter, "base": base}, ref="cuda", roof_impls=("cuda", "cuda-mma", "triton", "triton-splitk", "base"),
                   check=("eager", "cuda", "cuda-mma", "triton", "triton-splitk", "auto", "cublas-rows"))


def _by_shape(rows, variant: str) -> dict:
    """(M, K, N) -> impl -> row, for the measured rows of ``variant``."""
    by_key = {}
    for r in rows:
        if r["path"] == PATH and r["variant"] == variant and r["status"] == "ok":
            by_key.setdefault((r["shape"]["M"], r["shape"]["K"], r["shape"]["N"]), {})[r["impl"]] = r
    return by_key


# A win by less than this is within run-to-run noise (the 2026-11-28 report named the extension's
# BGMV for 4 rows on 21.4 against 21.6 us): not enough to move a dispatch table.
WIN_MARGIN = 0.03


def cuda_wins(rows, impl: str = "cuda") -> dict:
    """op -> the largest M such that at every M' <= M, and every shape measured, the CUDA
    kernel of column ``impl`` ran (its row's dispatch says so) and beat Triton by at least
    WIN_MARGIN (graph times)."""
    verdicts = {}  # op -> M -> CUDA won at every shape (and variant) of that M
    for variant, op in OPS.items():
        verdict = verdicts.setdefault(op, {})
        for (M, _, _), impls in _by_shape(rows, variant).items():
            cuda, triton = impls.get(impl), impls.get("triton")
            ran = cuda is not None and any(f"{op}:cuda:" in d for d in cuda.get("dispatch", []))
            won = ran and triton is not None and best_ms(cuda) * (1 + WIN_MARGIN) <= best_ms(triton)
            verdict[M] = verdict.get(M, True) and won
    table = {}
    for op, verdict in verdicts.items():
        best = 0
        for M in sorted(verdict):
            if not verdict[M]:
                break
            best = M
        if best:
            table[op] = best
    return table


def host_table(rows) -> list:
    """Markdown rows of eager per-call wall times (no graph) at each M: what backend.HOST_WINS
    rests on. ``auto`` outside a capture runs the host path; ``triton`` is what a capture runs."""
    out = []
    for variant, op in OPS.items():
        for (M, K, N), impls in sorted(_by_shape(rows, variant).items()):
            # back-to-back eager calls (time_loop) where measured: do_bench's flushes hide host time
            ms = {i: r.get("loop_ms") or r["median_ms"] for i, r in impls.items() if r.get("median_ms")}
            cells = [f"{ms[i] * 1e3:.1f}" if i in ms else "—" for i in ("auto", "triton", "cuda", "cuda-mma", "eager")]
            out.append(f"| {op} | {M} | {K} | {N} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["## decode · eager calls (no graph): us per call, what backend.HOST_WINS rests on", "",
            "| op | M | K | N | auto | triton | cuda | cuda-mma | eager |", "|---|---|---|---|---|---|---|---|---|",
            *out, ""]


def summary(rows) -> list:
    """Markdown lines for the report: the CUDA_WINS table these measurements support."""
    if not any(r["path"] == PATH for r in rows):
        return []
    return ["## decode · the dispatch table these numbers support", "",
            "`fusedlora.backend.CUDA_WINS = " + repr(cuda_wins(rows)) + "`  (FUSEDLORA_CUDA_GEMV=fma, the default)",
            "",
            "`fusedlora.backend.CUDA_WINS = " + repr(cuda_wins(rows, "cuda-mma")) + "`  (FUSEDLORA_CUDA_GEMV=mma)", "",
            "(op -> the largest row count up to which the CUDA kernel beat Triton by 3 % or more at every "
            "shape and every smaller row count, CUDA-graph times; ops missing stay on Triton.)", "",
            *host_table(rows)]
