"""Routed decode batches that mix adapter kinds: T rows over LoRA, C3A and sparse adapters,
each row its own adapter (inference, as a serving loop calls it).

Implementations, all timed on the same random input sets:
  rows         FusedLinear(x, adapter_ids=ids, validate=False): LoRA rows in the BGMV kernels,
               every C3A and sparse row's delta added in one launch (fusedlora.weight_delta_rows)
  per-adapter  the same call with weight_delta_rows.use_one_launch(False): each C3A and sparse
               adapter's delta computed over the whole batch and masked (no host sync), the
               form that served these rows before
  validated    validate=True, one launch off: the validation's host sync counts the rows of
               each adapter and each delta runs over its own rows (not capturable)
  base         F.linear(x, W, b) alone
Rows: A = 8 adapters, consecutive rows on different adapters: two LoRA r16, three C3A
(b = 64, 128, 64) and three sparse (1% of W each).
"""
from __future__ import annotations

import torch
from torch import nn

from fusedlora import FusedLinear, weight_delta_rows

from .harness import frozen_linear, Case, Options, base_thunk, elem_size, matmul_flops, numel_bytes
from .sparse import mask

PATH = "kinds"
KINDS = ("lora", "c3a", "sparse", "lora", "c3a", "sparse", "c3a", "sparse")
RANK, DENSITY = 16, 0.01


def shapes(opts: Options):
    if opts.smoke:
        return [dict(T=4, K=64, N=64)]
    return [dict(T=t, K=4096, N=4096) for t in ((16, 64) if opts.quick else (1, 16, 64))]


def _blocks(K: int):
    """The C3A adapters' block sizes, in KINDS order."""
    return iter((8, 16, 8) if K < 1024 else (64, 128, 64))


def _inputs(s: dict, device, dtype, seed: int):
    T, K, N = s["T"], s["K"], s["N"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * std).to(device, dt)

    blocks = _blocks(K)
    adapters = []
    for a, kind in enumerate(KINDS):
        if kind == "lora":
            adapters.append((kind, rnd(RANK, K, std=K ** -0.5), rnd(N, RANK, std=RANK ** -0.5)))
        elif kind == "c3a":
            b = next(blocks)  # deltas divided by K: scaled to be visible in 16 bits
            adapters.append((kind, b, rnd(N // b, K // b, b, std=K ** 0.5 / b ** 0.5, dt=torch.float32)))
        else:
            idx = mask(N, K, DENSITY, seed * 8 + a).to(device)
            adapters.append((kind, idx, rnd(idx.shape[1], std=K ** -0.5)))
    return {"x": rnd(T, K), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1), "adapters": adapters,
            "slots": [t % len(KINDS) for t in range(T)]}


def _layer(i):
    layer = FusedLinear.from_linear(frozen_linear(i["W"], i["b"]))
    names = [f"kinds_{a}" for a in range(len(i["adapters"]))]
    for n, (kind, p, q) in zip(names, i["adapters"]):
        if kind == "lora":
            layer.add_lora(n, r=RANK, lora_alpha=2 * RANK)
            layer.lora_A[n] = nn.Parameter(p, requires_grad=False)
            layer.lora_B[n] = nn.Parameter(q, requires_grad=False)
        elif kind == "c3a":
            layer.add_c3a(n, block_size=p)
            layer.c3a_kernel[n] = nn.Parameter(q, requires_grad=False)
        else:
            layer.add_sparse(n, p, q.detach())
            layer.sparse_values[n].requires_grad_(False)
    layer.eval()
    ids = torch.tensor([layer.adapter_id(names[a]) for a in i["slots"]], device=i["x"].device)
    return layer, ids


def _routed(one_launch: bool, validate: bool):
    def setup(i):
        layer, ids = _layer(i)

        @torch.no_grad()
        def fwd():
            with weight_delta_rows.use_one_launch(one_launch):
                return layer(i["x"], adapter_ids=ids, validate=validate)

        fwd()  # the pool, the layouts and the address table, outside the timing
        if validate:
            fwd.no_graph = "validation copies the rows per adapter to the host"
        return fwd
    return setup


def work(s: dict, elem: int):
    """(flops, minimal bytes): the base GEMM, each row's adapter product (LoRA 2 r (K + N),
    C3A as the circulant product 2 N K, sparse 2 nnz), x, W, b, y and the adapters with rows."""
    T, K, N = s["T"], s["K"], s["N"]
    nnz = round(DENSITY * N * K)
    used = sorted({t % len(KINDS) for t in range(T)})
    row_flops = {"lora": 2.0 * RANK * (K + N), "c3a": 2.0 * N * K, "sparse": 2.0 * nnz}
    blocks = _blocks(K)
    ad_bytes = {}
    for a, kind in enumerate(KINDS):
        ad_bytes[a] = (elem * RANK * (K + N) if kind == "lora" else 4.0 * N * K / next(blocks) if kind == "c3a"
                       else nnz * (elem + 8.0))
    flops = matmul_flops((T, N, K)) + sum(row_flops[KINDS[t % len(KINDS)]] for t in range(T))
    nbytes = numel_bytes(elem, (T, K), (N, K), (N,), (T, N)) + sum(ad_bytes[a] for a in used) + 8 * T
    base = (matmul_flops((T, N, K)), numel_bytes(elem, (T, K), (N, K), (N,), (T, N)))
    return (flops, nbytes), base


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    seeds = iter(range(10**9))
    for s in shapes(opts):
        (flops, nbytes), base = work(s, elem)
        yield Case(path=PATH, variant="fwd", shape=s, dtype=opts.dtype, device=opts.device,
                   make_inputs=lambda s=s: _inputs(s, opts.device, opts.dtype, next(seeds)),
                   impls={"rows": _routed(True, False), "per-adapter": _routed(False, False),
                          "validated": _routed(False, True), "base": base_thunk},
                   work={"*": (flops, nbytes), "base": base}, ref="rows", roof_impls=("rows",),
                   check=("per-adapter", "rows", "validated"))
