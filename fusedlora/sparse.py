"""Sparse-delta adapters (SHiRA): y = x (W + scaling * S)^T + b, S sparse.

Same math as PEFT's SHiRA tuner: ``indices`` (2, nnz), row i in out_features N and
column in in_features K of the value ``values[i]``; S is their sparse matrix (N x K)
and ``scaling`` multiplies it. The nonzeros reach the kernels in the tile-bucketed
layout of ``fusedlora.sparse_layout`` (built once per adapter; its mask builders and
index checks are re-exported here). ``scatter_merge_`` adds (sign=+1) or removes
(sign=-1) scaling * S in place in O(nnz): merge, unmerge and switching between sparse
adapters without a dense delta.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .backend import cdiv, interpreting, record, requested_backend, select_backend
from .ops import (autocast_inputs, bias_grad, check_linear_args, check_scalar, fused_op, pick, register_autograd,
                  rows_of, triton_dtype_ok, triton_serves)
from .derived import DerivedCache, optimizer_steps, version
from .sparse_layout import SparseLayout, _user_indices, build_layout, check_indices
# the public mask builders, where users of fusedlora.sparse look for them
from .sparse_layout import magnitude_indices, mask_to_indices, random_indices, shira_num_nonzeros  # noqa: F401

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -------------------------------------------------------------- validation
def _check_values(values, nnz: int, x: Tensor, x_name: str = "x") -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a torch.Tensor of shape (nnz,), got {type(values).__name__}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"values: expected a floating dtype {_FLOAT_DTYPES}, got {values.dtype}")
    if values.dim() != 1 or values.shape[0] != nnz:
        raise ValueError(f"values: expected shape ({nnz},) (one per nonzero of indices), got {tuple(values.shape)}")
    if values.device != x.device:
        raise ValueError(f"values: device {values.device} does not match {x_name}'s device {x.device}")


def check_sparse_args(x, weight, bias, indices, values, scaling, layout=None) -> float:
    """Argument checks of ``sparse_linear`` (range and duplicates only when no layout is given)."""
    check_linear_args(x, weight, bias)
    shape = tuple(weight.shape)
    if layout is not None:
        if not isinstance(layout, SparseLayout):
            raise TypeError(f"layout: expected a SparseLayout (fusedlora.sparse.build_layout), "
                            f"got {type(layout).__name__}")
        if tuple(layout.shape) != shape:
            raise ValueError(f"layout: built for a weight of shape {tuple(layout.shape)}, weight is {shape}")
        if layout.device != x.device:
            raise ValueError(f"layout: device {layout.device} does not match x's device {x.device}; "
                             f"use layout.to({str(x.device)!r})")
        nnz = layout.nnz
        if indices is not None:
            check_indices(indices, shape, check_values=False)
            if indices.shape[1] != nnz:
                raise ValueError(f"indices: {indices.shape[1]} nonzeros, but the layout has {nnz}")
    else:
        if indices is None:
            raise ValueError("indices: required when no prebuilt layout is given")
        check_indices(indices, shape, check_values=False)
        nnz = indices.shape[1]
    _check_values(values, nnz, x)
    return check_scalar("scaling", scaling)


# ------------------------------------------------------------------ launch
@functools.lru_cache(maxsize=None)
def _tuned_kernel(tile: int):
    import triton

    from .kernels.sparse import sparse_matmul_kernel
    from .launch import autotuned

    if interpreting():
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": max(16, tile), "BLOCK_K": max(16, tile),
                                  "BLOCK_E": 16, "GROUP_M": 2})]
    else:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": max(bn, tile), "BLOCK_K": max(64, tile),
                           "BLOCK_E": 32, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4),
                                 (64, 128, 4, 4), (64, 64, 4, 4))
        ]
    return autotuned(sparse_matmul_kernel, configs, ["M_BUCKET", "N", "K"])


def _plan(M: int, N: int, K: int, tile: int, device: torch.device) -> Optional[dict]:
    """Tiles for the memory-bound shapes (few rows: split K to fill the GPU), or
    None for the autotuned GEMM. Block sizes are multiples of the layout tile."""
    from .launch import finish_plan

    if interpreting():
        plan = {"BLOCK_M": 16, "BLOCK_N": max(16, tile), "BLOCK_K": max(16, tile), "BLOCK_E": 16, "GROUP_M": 2}
    elif M <= 16:
        plan = {"BLOCK_M": 16, "BLOCK_N": max(64, tile), "BLOCK_K": max(64, tile), "BLOCK_E": 32, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 4}
    else:
        return None
    return finish_plan(plan, M, N, K, device)


def _sparse_matmul(a: Tensor, b: Tensor, layout: Tuple[Tensor, Tensor, Tensor, Tensor], values: Tensor,
                   scaling: float, tile: int, w_shape: Tuple[int, int], transposed: bool,
                   bias: Optional[Tensor], out_dtype: torch.dtype, tag: str) -> Tensor:
    """C = a @ (b + scaling * D) (+ bias). Forward (transposed=False): b = W^T, D = S^T;
    dx (transposed=True): b = W, D = S. ``layout`` = (offsets, rows, cols, perm)."""
    from .kernels.sparse import sparse_matmul_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype, bias_arg, gemm_output, launch_gemm

    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return torch.zeros((M, N), device=a.device, dtype=out_dtype)
    offsets, rows, cols, perm = layout
    num_tr, num_tc = -(-w_shape[0] // tile), -(-w_shape[1] // tile)
    if transposed:  # output along W's columns, reduction along its rows
        red_idx, out_idx, num_tn, num_tk, bs_n, bs_k = rows, cols, num_tc, num_tr, 1, num_tc
    else:
        red_idx, out_idx, num_tn, num_tk, bs_n, bs_k = cols, rows, num_tr, num_tc, num_tc, 1
    has_delta = rows.shape[0] > 0
    plan = _plan(M, N, K, tile, a.device)
    c = gemm_output(M, N, plan, out_dtype, a.device)
    dummy = c
    args = (
        a, b, c, bias_arg(bias, dummy),
        offsets if has_delta else dummy, red_idx if has_delta else dummy, out_idx if has_delta else dummy,
        perm if has_delta else dummy, values if has_delta else dummy,
        M, N, K, _pow2_at_least(M, 1), num_tn, num_tk,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        bs_n, bs_k, float(scaling),
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_DELTA=has_delta, DOT_DTYPE=_tl_dtype(a.dtype),
                 INPUT_PRECISION=_input_precision(a.dtype), TILE=tile)
    launch_gemm(sparse_matmul_kernel, lambda: _tuned_kernel(tile), plan, M, N, args, flags, tag)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _sddmm(grad_y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, perm: Tensor, scaling: float,
           out_dtype: torch.dtype) -> Tensor:
    """d_values (user order) = scaling * (grad_y^T x)[rows, cols], sampled at the nonzeros only."""
    from .kernels.sparse import sddmm_kernel
    from .launch import _target_programs

    M, nnz = x.shape[0], rows.shape[0]
    if nnz == 0 or M == 0:
        return torch.zeros((nnz,), device=x.device, dtype=out_dtype)
    block_m, block_e = (16, 16) if interpreting() else (64, 64)
    chunks, m_blocks = cdiv(nnz, block_e), cdiv(M, block_m)
    split = max(1, min(m_blocks, cdiv(_target_programs(x.device), chunks)))
    rows_per_split = cdiv(m_blocks, split) * block_m
    split = cdiv(M, rows_per_split)
    out = (torch.zeros if split > 1 else torch.empty)(
        (nnz,), device=x.device, dtype=torch.float32 if split > 1 else out_dtype)
    sddmm_kernel[(chunks, split)](
        grad_y, x, rows, cols, perm, out, M, nnz, rows_per_split,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), float(scaling),
        SPLIT_M=min(split, 2), BLOCK_M=block_m, BLOCK_E=block_e)  # the kernel only asks "split?": one variant
    record("sparse.grad_values", "triton", "sddmm")
    return out if out.dtype == out_dtype else out.to(out_dtype)


_CSR_CACHE = DerivedCache(limit=64)


def _row_csr(rows: Tensor, cols: Tensor, perm: Tensor, n_rows: int):
    """The layout's nonzeros grouped by row for the CUDA decode kernel: (row_ptr
    int32 (n_rows + 1,), col int32, order) with values[order] in that order.
    Built on the device without a host sync and cached while the layout lives."""
    def build():
        by_row = torch.sort(rows.long(), stable=True).indices
        rows_sorted = rows[by_row].contiguous()
        bounds = torch.arange(n_rows + 1, device=rows.device, dtype=rows_sorted.dtype)
        row_ptr = torch.searchsorted(rows_sorted, bounds).to(torch.int32)
        return row_ptr, cols[by_row].to(torch.int32).contiguous(), perm[by_row].long()

    return _CSR_CACHE.get_or_build((rows.device, rows.data_ptr(), n_rows), (rows, cols, perm), build)


DECODE_ROWS = 16


def _rows_decode(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor, rows: Tensor, cols: Tensor,
                 perm: Tensor, scaling: float) -> Tensor:
    """1..16 rows on Triton: the base GEMM's decode plan into float32, then each output
    feature's nonzeros (CSR rows, built once per layout) added before the one rounding;
    as a decode pair unless launch.DECODE_PAIR is off (the base's K-split partials, then
    one finishing kernel that sums them with the nonzeros and the bias: two launches).
    W is streamed once and never merged into; the tile-merging GEMM would spend five
    one-hot products per weight tile here (129 us against 14 us for F.linear at 1 row,
    4096 x 4096 on the H200)."""
    from .kernels.sparse import sparse_decode_finish_kernel, sparse_rows_add_kernel
    from .launch import _pow2_at_least, bias_arg, decode_pair_serves, decode_partials, matmul

    M, N = x.shape[0], weight.shape[0]
    row_ptr, col, order = _row_csr(rows, cols, perm, N)
    block_n = 32
    if decode_pair_serves(x, weight, False):  # two launches, no memset (launch.DECODE_PAIR)
        part, plan, r_cols = decode_partials(x, weight)
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        sparse_decode_finish_kernel[(cdiv(N, block_n),)](
            part, x, row_ptr, col, values.contiguous(), order, bias_arg(bias, y), y,
            M, N, r_cols, part.stride(0), part.stride(1), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            float(scaling), HAS_BIAS=bias is not None, SPLIT_K=plan["SPLIT_K"], BLOCK_M=_pow2_at_least(M, 1),
            BLOCK_N=block_n, BLOCK_E=16)
        record("sparse.forward", "triton", "rows-decode")
        return y
    y = matmul(x, weight.t(), out_dtype=torch.float32, dot_dtype=x.dtype, bias=bias, tag="sparse.base")
    sparse_rows_add_kernel[(cdiv(N, block_n),)](
        y, x, row_ptr, col, values.contiguous(), order, M, N, y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        float(scaling), BLOCK_M=_pow2_at_least(M, 1), BLOCK_N=block_n, BLOCK_E=16)
    record("sparse.forward", "triton", "rows")
    return y.to(x.dtype)


def _dense_weight(weight: Tensor, layout: Tuple[Tensor, ...], values: Tensor, scaling: float, tile: int) -> Tensor:
    """W + scaling * S in W's dtype, as PEFT's SHiRA layer forms it: each nonzero's
    W + s * v summed in float32 and rounded once. On CUDA (and under the interpreter) one
    Triton kernel copies W tile by tile and rewrites each tile's nonzeros from the layout's
    buckets: a single pass over W; elsewhere a copy of W and an index_put."""
    offsets, rows, cols, perm = layout
    N, K = weight.shape
    w = torch.empty((N, K), device=weight.device, dtype=weight.dtype)
    if triton_serves(w.device, w.dtype, values.dtype):
        from .kernels.sparse import sparse_densify_kernel

        block_k = 4 * tile  # the copy's tile; the layout's buckets are tile x tile
        sparse_densify_kernel[(cdiv(N, tile), cdiv(K, block_k))](
            w, weight, offsets, rows, cols, perm, values.detach().contiguous(), N, K, cdiv(K, tile),
            w.stride(0), w.stride(1), weight.stride(0), weight.stride(1), float(scaling),
            TILE=tile, BLOCK_K=block_k, BLOCK_E=64)
        record("sparse.densify", "triton", "tiles")
        return w
    w.copy_(weight.detach())
    merge_saving_(w, rows.long(), cols.long(), values.detach()[perm.long()], scaling)
    record("sparse.densify", "torch", "index_put")
    return w


def _sampled(g: Tensor, rows: Tensor, cols: Tensor, perm: Tensor, scaling: float, values: Tensor) -> Tensor:
    """scaling * g[rows, cols] in the values' order and dtype: one Triton kernel on CUDA
    (and under the interpreter) where the torch form takes nine ops, each a host round
    trip in an eager training step (the H200's sparse step was host-bound: 610 us of
    kernels in 1444 us)."""
    dv = torch.empty_like(values)
    if rows.numel() and triton_serves(g.device, g.dtype, values.dtype):
        from .kernels.sparse import sparse_gather_kernel

        block = 1024
        sparse_gather_kernel[(cdiv(rows.numel(), block),)](
            dv, g, rows, cols, perm, rows.numel(), g.stride(0), g.stride(1), float(scaling), BLOCK_E=block)
        record("sparse.sample", "triton", "gather")
        return dv
    flat = rows.long() * g.shape[1] + cols.long()
    dv[perm.long()] = (g.reshape(-1)[flat].to(torch.promote_types(g.dtype, torch.float32)) * scaling).to(dv.dtype)
    record("sparse.sample", "torch", "index")
    return dv


def _dense_grads(grad_y: Tensor, x: Tensor, weight: Tensor, values: Tensor, layout: Tuple[Tensor, ...],
                 scaling: float, tile: int, needs: List[bool]) -> List[Tensor]:
    """cuBLAS for dx (through W + S, formed again) and for dY^T X, whose entries at the
    nonzeros are the value gradient: an N x K temporary, traded for a GEMM's speed."""
    need_x, need_w, need_b, need_v = needs
    dx, dW, db, dv = (grad_y.new_empty(0) for _ in range(4))
    _, rows, cols, perm = layout
    if need_x:
        dx = grad_y @ _dense_weight(weight, layout, values, scaling, tile)
    if need_w or need_v:
        g = grad_y.t() @ x
        if need_w:
            dW = g.to(weight.dtype)
        if need_v:
            dv = _sampled(g, rows, cols, perm, scaling, values)
    if need_b:
        db = bias_grad(grad_y, x.dtype)
    return [dx, dW, db, dv]


# ---------------------------------------------------------------- custom ops
@fused_op("fusedlora::sparse_linear")
def _sparse_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor, offsets: Tensor,
                    rows: Tensor, cols: Tensor, perm: Tensor, scaling: float, tile: int) -> Tensor:
    """2-D x -> y = x (W + scaling * S)^T + b, S given by values and the layout tensors."""
    backend = select_backend(x.device, "sparse.forward", x.shape[0])
    if backend == "triton" and requested_backend() == "auto" and not triton_serves(x.device, x.dtype, values.dtype):
        backend = "eager"  # auto's Triton rows path has no float64 kernel: the composition serves (recorded)
    if backend == "torch":
        record("sparse.forward", "torch", "reference")
        return reference.sparse_linear(x, weight, bias, _user_indices(rows, cols, perm), values, scaling)
    if backend == "eager":
        record("sparse.forward", "eager", "dense")
        return F.linear(x, _dense_weight(weight, (offsets, rows, cols, perm), values, scaling, tile), bias)
    if backend == "cuda":
        from .cuda_ext import decode_serves, gemv_for, load

        if decode_serves(x, weight):  # else Triton, recorded below
            row_ptr, col, order = _row_csr(rows, cols, perm, weight.shape[0])
            return load().sparse_decode(x, weight, bias, row_ptr, col, order, values, scaling,
                                        gemv=gemv_for("sparse.forward", "decode", x, weight))
    triton_dtype_ok(x)
    triton_dtype_ok(values, "values")
    if 0 < x.shape[0] <= DECODE_ROWS:
        return _rows_decode(x, weight, bias, values, rows, cols, perm, scaling)
    return _sparse_matmul(x, weight.t(), (offsets, rows, cols, perm), values.contiguous(), scaling, tile,
                          tuple(weight.shape), False, bias, x.dtype, "sparse.forward")


@_sparse_forward.register_fake
def _(x, weight, bias, values, offsets, rows, cols, perm, scaling, tile):
    return x.new_empty((x.shape[0], weight.shape[0]))


@fused_op("fusedlora::sparse_linear_backward")
def _sparse_backward(grad_y: Tensor, x: Tensor, weight: Tensor, values: Tensor, offsets: Tensor, rows: Tensor,
                     cols: Tensor, perm: Tensor, scaling: float, tile: int, needs: List[bool]) -> List[Tensor]:
    """(dx, dW, db, d_values); an empty tensor stands for a gradient not asked for."""
    need_x, need_w, need_b, need_v = needs
    backend = select_backend(x.device, "sparse.backward", x.shape[0])
    if backend == "torch":
        grads = reference.sparse_linear_grads(grad_y, x, weight, _user_indices(rows, cols, perm), values, scaling)
        record("sparse.backward", "torch", "reference")
        return [g if n else grad_y.new_empty(0) for g, n in zip(grads, needs)]
    if backend == "eager":
        record("sparse.backward", "eager", "dense")
        return _dense_grads(grad_y, x, weight, values, (offsets, rows, cols, perm), scaling, tile, needs)
    triton_dtype_ok(x)
    triton_dtype_ok(values, "values")
    from .launch import matmul

    dt = x.dtype
    # A fresh empty tensor per missing gradient: outputs of a custom op may not alias each other.
    dx, dW, db, dv = (grad_y.new_empty(0) for _ in range(4))
    if need_x:
        dx = _sparse_matmul(grad_y, weight, (offsets, rows, cols, perm), values.contiguous(), scaling, tile,
                            tuple(weight.shape), True, None, dt, "sparse.grad_x")
    if need_w:
        dW = matmul(grad_y.t(), x, out_dtype=weight.dtype, dot_dtype=dt, tag="sparse.grad_weight")
    if need_b:
        db = bias_grad(grad_y, dt)
    if need_v:
        dv = _sddmm(grad_y, x, rows, cols, perm, scaling, values.dtype)
    return [dx, dW, db, dv]


@_sparse_backward.register_fake
def _(grad_y, x, weight, values, offsets, rows, cols, perm, scaling, tile, needs):
    shapes = [x, weight, weight[:, 0], values]
    return [t.new_empty(t.shape) if n else grad_y.new_empty(0) for t, n in zip(shapes, needs)]


def _sparse_setup_context(ctx, inputs, output):
    x, weight, bias, values, offsets, rows, cols, perm, scaling, tile = inputs
    ctx.save_for_backward(x, weight, values, offsets, rows, cols, perm)
    ctx.scaling, ctx.tile = scaling, tile


def _sparse_autograd(ctx, grad_y):
    x, weight, values, offsets, rows, cols, perm = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3]]
    backward = pick(_sparse_backward, grad_y, x, weight, values)
    grads = backward(grad_y, x, weight, values, offsets, rows, cols, perm, ctx.scaling, ctx.tile, needs)
    dx, dW, db, dv = (g if need else None for g, need in zip(grads, needs))
    return dx, dW, db, dv, None, None, None, None, None, None


register_autograd(_sparse_forward, _sparse_autograd, _sparse_setup_context)


def sparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Optional[Tensor], values: Tensor,
                  scaling: float = 1.0, layout: Optional[SparseLayout] = None) -> Tensor:
    """y = x (W + scaling * S)^T + b for x of shape (..., in_features), PEFT's SHiRA forward, fused.

    S[indices[0, i], indices[1, i]] = values[i]. Differentiable in x, weight,
    bias and values (d_values in the order of ``values``). Pass the ``layout``
    that ``build_layout`` made when the adapter was added to skip rebuilding
    it (and the host-synchronising checks of indices) on every call;
    ``indices`` may then be None. Under ``torch.autocast``, x, W and b are cast to the
    autocast dtype as ``F.linear``'s are; the values keep their own.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    scaling = check_sparse_args(x, weight, bias, indices, values, scaling, layout)
    if layout is None:
        layout = build_layout(indices, tuple(weight.shape), device=x.device)
    lead = x.shape[:-1]
    op = pick(_sparse_forward, x, weight, bias, values)
    y = op(rows_of(x), weight, bias, values, *layout.tensors(), scaling, layout.tile)
    return y.reshape(*lead, weight.shape[0])


# ------------------------------------------------------------ merge / switch
@torch.no_grad()
def scatter_merge_(weight: Tensor, indices: Tensor, values: Tensor, scaling: float = 1.0, sign: int = 1,
                   validate: bool = True) -> Tensor:
    """W += sign * scaling * S in place, O(nnz) (a scatter-add; no dense delta).

    sign=+1 merges, sign=-1 unmerges; switching adapters is an unmerge of one
    and a merge of the other (``scatter_switch_``). The delta is formed in
    float32 (or wider), rounded to W's dtype and added there (two roundings in 16
    bits, as PEFT's merge; FusedLinear's merge rounds once and unmerges exactly, see
    merge_saving_). Returns ``weight``."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_DTYPES or weight.dim() != 2:
        raise TypeError(f"weight: expected a 2-D floating torch.Tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise ValueError(f"sign: expected +1 (merge) or -1 (unmerge), got {sign!r}")
    rows, cols = check_indices(indices, tuple(weight.shape), check_values=validate)
    _check_values(values, indices.shape[1], weight, "weight")
    scaling = check_scalar("scaling", scaling)
    dt = torch.promote_types(values.dtype, torch.float32)
    delta = (values.to(dt) * (sign * scaling)).to(weight.dtype)
    rows, cols = rows.to(weight.device), cols.to(weight.device)
    if weight.is_contiguous():  # one flat index_add_: 3-8x faster than a 2-D index_put_ on the CPU
        weight.view(-1).index_add_(0, rows * weight.shape[1] + cols, delta)
    else:
        weight.index_put_((rows, cols), delta, accumulate=True)
    return weight


class SavedEntries(NamedTuple):
    """What ``merge_saving_`` overwrote and wrote: W's entries at the adapter's positions
    before the merge (``saved``) and after it (``written``), in W's dtype, and where; W's
    version counter, storage and the process's optimizer steps right after the merge."""
    rows: Tensor
    cols: Tensor
    saved: Tensor
    written: Tensor
    version: Optional[int] = None
    data_ptr: int = -1
    steps: int = -1


def _entries_of(weight: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    if weight.is_contiguous():  # one flat gather: several times faster than a 2-D one on the CPU
        return weight.view(-1)[rows * weight.shape[1] + cols]
    return weight[rows, cols]


def _write_entries(weight: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> None:
    if weight.is_contiguous():
        weight.view(-1).index_put_((rows * weight.shape[1] + cols,), values)
    else:
        weight.index_put_((rows, cols), values)


def merged_entries(weight: Tensor, rows: Tensor, cols: Tensor, values: Tensor, scaling: float):
    """(W's entries at (rows, cols), what a merge writes there: round(W + scaling * v), summed
    in float32 or wider and rounded once to W's dtype)."""
    entries = _entries_of(weight, rows, cols)
    dt = torch.promote_types(values.dtype, torch.float32)
    return entries, (entries.to(dt) + values.to(device=weight.device, dtype=dt) * scaling).to(weight.dtype)


@torch.no_grad()
def merge_saving_(weight: Tensor, rows: Tensor, cols: Tensor, values: Tensor, scaling: float) -> SavedEntries:
    """W[r, c] = round(W[r, c] + scaling * v) at the positions (rows, cols) (distinct, in
    range: checked by the caller; any strides of W), keeping the entries it overwrites and
    the ones it writes. O(nnz): a gather, an add in float32, a scatter; no atomics."""
    saved, written = merged_entries(weight, rows, cols, values, scaling)
    _write_entries(weight, rows, cols, written)
    return SavedEntries(rows, cols, saved, written, version(weight), weight.data_ptr(), optimizer_steps())


@torch.no_grad()
def unmerge_saved_(weight: Tensor, saved: SavedEntries, values: Tensor, scaling: float) -> bool:
    """Undo ``merge_saving_``. When no write to W since the merge shows (its version counter,
    storage and the optimizer steps are as they were), the saved entries go back, bit for
    bit, without a host sync. Otherwise position by position: where W still holds what the
    merge wrote, the saved entry goes back; where it was changed (an optimizer step, fused or
    not, a load, another merge), the delta is subtracted from the new value, keeping the
    change. Any number of merges and unmerges, in any order, of adapters sharing positions
    or not, leave untouched entries exactly as they were. A write through ``.data`` bumps
    nothing and is not seen by the fast path. True when every entry was restored."""
    rows, cols = saved.rows.to(weight.device), saved.cols.to(weight.device)
    now_version = version(weight)
    if (now_version is not None and now_version == saved.version and weight.data_ptr() == saved.data_ptr
            and optimizer_steps() == saved.steps and saved.saved.dtype == weight.dtype):
        # nothing wrote W since the merge that a counter sees (a fused step bumps only the
        # steps): the saved entries back, no compare and no host sync (a switch's fast path)
        _write_entries(weight, rows, cols, saved.saved.to(weight.device))
        return True
    now = _entries_of(weight, rows, cols)
    written = saved.written.to(device=weight.device, dtype=weight.dtype)
    same = (now == written) | (now.isnan() & written.isnan())  # a NaN value merged is still "what was written"
    dt = torch.promote_types(values.dtype, torch.float32)
    subtracted = (now.to(dt) - values.to(device=weight.device, dtype=dt) * scaling).to(weight.dtype)
    back = torch.where(same, saved.saved.to(device=weight.device, dtype=weight.dtype), subtracted)
    _write_entries(weight, rows, cols, back)
    return bool(same.all())


def scatter_switch_(weight: Tensor, old: Optional[Sequence], new: Optional[Sequence],
                    validate: bool = True) -> Tensor:
    """Swap sparse adapters in place: unmerge ``old`` and merge ``new``, each
    (indices, values, scaling) or None. O(nnz_old + nnz_new); ``validate=False``
    skips the range/duplicate checks (a sort) for indices checked before."""
    if old is not None:
        scatter_merge_(weight, *old, sign=-1, validate=validate)
    if new is not None:
        scatter_merge_(weight, *new, sign=1, validate=validate)
    return weight
