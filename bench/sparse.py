"""Sparse-delta (SHiRA) rows: fused ``fusedlora.sparse.sparse_linear`` against the ways people run it today.

Implementations, all timed on the same random input sets:
  fused    fusedlora.sparse.sparse_linear with the layout that build_layout made when the
           adapter was added (as FusedLinear does: no per-call layout work), on the
           Triton kernels (use_backend("triton"))
  auto     the same call under fusedlora's default dispatch (backend.EAGER_WINS sends
           sparse above 16 rows to the dense composition on CUDA, Triton's rows path
           below; the reference on the CPU)
  base     F.linear(x, W, b) alone: the floor the adapter's cost is measured from
  eager    PEFT's SHiRA algorithm: clone W, add the torch.sparse_coo_tensor of
           scaling * values, F.linear with the result
  compile  torch.compile (static shapes) of eager written with ops dynamo traces: the same
           math and traffic (a full copy of W per call, the nonzeros scatter-added into it) as
           W.index_put((rows, cols), scaling * values, accumulate=True); torch.sparse_coo_tensor
           itself is a graph break, which would leave the compiled graphs no different from eager
  peft     peft.tuners.shira.layer.Linear wrapping an nn.Linear, given the same
           indices and values (its own r only sizes its init; see _peft)
  inplace  forward only, a bound and not a fusedlora path: the nonzeros merged into W in
           place around F.linear and put back bit for bit (sparse.merge_saving_, then the
           saved entries written back), no copy of W; unsafe where another stream or thread reads W
           meanwhile, which is why the default path copies W
Variants: fwd; fwd+bwd with W frozen (grads of x and the values; the base: of x only).
Densities are fractions of W's N*K entries; the mask is uniformly random
(fusedlora.sparse.random_indices, PEFT's random_mask for the same seed).

Switching adapters in place is timed separately, in bench/switch.py.
"""
from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fusedlora.sparse import build_layout, random_indices, shira_num_nonzeros, sparse_linear

from .harness import (frozen_linear, Options, Skip, adapter_case, base_thunk, compiled, elem_size, on_backend,
                      grad_thunk, matmul_flops, numel_bytes, random_maker)

# PEFT's SHiRA builds a torch.sparse_coo_tensor per call; torch warns about it every time.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

PATH = "sparse"
VARIANTS = ("fwd", "fwd+bwd")
DENSITIES = (0.005, 0.01, 0.02)
SCALING = 1.0  # PEFT's default SHiRA scale


def shapes(opts: Options):
    if opts.smoke:
        # one shape: each row costs a torch.compile
        return [dict(M=16, K=64, N=64, density=0.02, nnz=shira_num_nonzeros((64, 64), density=0.02))]
    Ms = (1, 4096) if opts.quick else (1, 16, 4096)
    ds = (0.01,) if opts.quick else DENSITIES
    return [dict(M=m, K=4096, N=4096, density=d, nnz=shira_num_nonzeros((4096, 4096), density=d))
            for d in ds for m in Ms]


def work(s: dict, variant: str, elem: int):
    """(flops, minimal bytes) of the sparse-delta layer and of the base layer alone.

    Minimal traffic of the delta: each nonzero's value and its (row, col) as
    two int32. The forward adds 2 M nnz FLOPs for x S^T; the backward adds
    dx = gy (W + s S) and the sampled d_values = s (gy^T x)[rows, cols]."""
    M, K, N, nnz = s["M"], s["K"], s["N"], s["nnz"]
    delta_bytes = nnz * (elem + 8.0)
    base_flops = matmul_flops((M, N, K))
    base_bytes = numel_bytes(elem, (M, K), (N, K), (N,), (M, N))
    flops, nbytes = base_flops + 2.0 * M * nnz, base_bytes + delta_bytes
    if variant == "fwd":
        return (flops, nbytes), (base_flops, base_bytes)
    flops += matmul_flops((M, K, N)) + 4.0 * M * nnz         # dx (dense + sparse part), d_values
    nbytes += numel_bytes(elem, (M, N), (M, K), (nnz,))       # read gy, write dx and d_values
    base_flops += matmul_flops((M, K, N))
    base_bytes += numel_bytes(elem, (M, N), (M, K))
    return (flops, nbytes), (base_flops, base_bytes)


@functools.lru_cache(maxsize=32)
def mask(N: int, K: int, density: float, seed: int) -> torch.Tensor:
    """(2, nnz) int64 CPU indices of a random mask, cached: drawing one is a
    randperm of N*K, which would otherwise dominate a CPU run's setup."""
    return random_indices((N, K), density=density, seed=seed)


def _inputs(s: dict, variant: str, device, dtype, seed: int):
    M, K, N, d = s["M"], s["K"], s["N"], s["density"]

    rnd = random_maker(device, dtype)

    train = variant != "fwd"
    indices = mask(N, K, d, seed).to(device)
    inp = {"x": rnd(M, K).requires_grad_(train), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1),
           "indices": indices, "layout": build_layout(indices, (N, K), device=device),
           "values": rnd(indices.shape[1], std=K ** -0.5).requires_grad_(train)}  # random, not PEFT's zeros
    if train:
        inp["gy"] = rnd(M, N)
    return inp


def eager(x, W, bias, indices, values, scaling: float):
    """PEFT's SHiRA forward: a dense copy of W plus the sparse delta, then F.linear."""
    new_weight = W.clone()
    new_weight += torch.sparse_coo_tensor(indices, values * scaling, W.shape)
    return F.linear(x, new_weight, bias)


def eager_traceable(x, W, bias, indices, values, scaling: float):
    """eager's math in ops that torch.compile traces: copy of W, scatter-add, F.linear."""
    new_weight = W.index_put((indices[0], indices[1]), values * scaling, accumulate=True)
    return F.linear(x, new_weight, bias)


def _auto(i):
    return grad_thunk(lambda: sparse_linear(i["x"], i["W"], i["b"], None, i["values"], SCALING, layout=i["layout"]),
                      i, [i["x"], i["values"]])


def _fused(i):
    return on_backend("triton", _auto(i))


def _eager(i, fn=None):
    fn = eager if fn is None else fn
    return grad_thunk(lambda: fn(i["x"], i["W"], i["b"], i["indices"], i["values"], SCALING), i,
                      [i["x"], i["values"]])


def _inplace(i):
    if "gy" in i:
        raise Skip("forward only: a bound for the forward's copy of W")
    from fusedlora.sparse import _write_entries, merge_saving_

    x, W, b, idx, values = i["x"], i["W"], i["b"], i["indices"], i["values"].detach()
    rows, cols = idx[0].long(), idx[1].long()  # once per adapter, as a layout

    def run():
        saved = merge_saving_(W, rows, cols, values, SCALING)
        try:
            return F.linear(x, W, b)
        finally:  # put back unconditionally: unmerge_saved_'s per-position check would sync
            _write_entries(W, rows, cols, saved.saved)
    return run


def peft_shira_layer(W: torch.Tensor, bias, indices: torch.Tensor, values: torch.Tensor, scaling: float):
    """PEFT's SHiRA Linear over W (shared, not copied) with the given nonzeros.

    PEFT sizes a layer's nonzeros as r * (in + out); densities of N*K rarely
    are such a multiple, so the layer is built with r=1 and no mask, then
    given the indices (int32, as PEFT stores them) and the values: its
    forward and merge use only those. Raises Skip when PEFT is missing."""
    try:
        from peft.tuners.shira.config import ShiraConfig
        from peft.tuners.shira.layer import Linear as ShiraLinear
    except Exception as e:  # any import failure means: no PEFT row here
        raise Skip(f"peft SHiRA not importable: {type(e).__name__}: {e}") from None
    N, K = W.shape
    base = frozen_linear(W, bias)
    layer = ShiraLinear(base, None, "default", ShiraConfig(r=1, init_weights=True, target_modules=["base"]), r=1)
    layer.shira_indices["default"] = indices.to(torch.int)
    pv = nn.Parameter(values.detach(), requires_grad=values.requires_grad)  # shares the case's values
    layer.shira_weight["default"] = pv
    layer.set_scale("default", scaling)
    return layer, pv


def _peft(i):
    layer, pv = peft_shira_layer(i["W"], i["b"], i["indices"], i["values"], SCALING)
    return grad_thunk(lambda: layer(i["x"]), i, [i["x"], pv])


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    for variant in VARIANTS:
        for s in shapes(opts):
            seeds = itertools.count()  # one mask per rotating input set
            yield adapter_case(PATH, variant, s, opts,
                               lambda s=s, v=variant, seeds=seeds: _inputs(s, v, opts.device, opts.dtype, next(seeds)),
                               {"fused": _fused, "auto": _auto, "base": base_thunk, "eager": _eager,
                                "compile": compiled(eager_traceable, lambda fn, i: _eager(i, fn)), "peft": _peft,
                                "inplace": _inplace},
                               work(s, variant, elem))
