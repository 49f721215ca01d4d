"""Batched multi-adapter serving: every row of a batch picks its own adapter.
This module holds the fused ops; fusedlora.routing the ids, the pool and the
layer/model entry points.

    layer.add_lora("a", r=8); layer.add_lora("b", r=64); layer.add_c3a("c", block_size=64)
    ids = torch.tensor([layer.adapter_id("b"), -1, layer.adapter_id("a"), ...], device=x.device)
    y = layer(x, adapter_ids=ids)          # one id per sample or per row; -1 = base only
    with fusedlora.use_adapters(model, ids):
        logits = model(input_ids)          # every FusedLinear inside routes by ids

Pieces (docs/multi.md has the design note):

* Global ids (``REGISTRY``): an adapter name gets an integer id the first time
  any layer of the process adds it, and keeps it for the life of the process,
  so one ``ids`` tensor routes a whole model. Ids are never given to another
  name.
* Per-layer unified pool (``AdapterPool``): the rows of every LoRA A stacked
  in one growable buffer (R_total x in_features), the rows of every B^T in
  another (R_total x out_features), S-LoRA style: ranks differ without
  padding, an adapter added is appended (capacity doubling: amortised O(its
  size)), one deleted leaves a hole that a compaction reclaims once holes
  outweigh live rows (amortised O(its size) as well). Small device tables
  give each adapter slot its pool offset, rank and scale.
* Source of truth: ``lora_A[name]`` / ``lora_B[name]`` stay the parameters.
  The pool is a copy, re-synchronised lazily at each multi-adapter forward
  from the parameters' identity, storage, shape and in-place version counter
  (``Tensor._version``, bumped by ``copy_``, ``load_state_dict`` and unfused
  optimizer steps), and the process's optimizer-step count (fused steps bump
  no version): only the adapters that changed are copied again.
  When gradients must reach the parameters (grad mode on and some LoRA
  parameter requires grad) or under torch.compile, the pool is instead the
  differentiable ``torch.cat`` of the parameters, built per call.
* Kernels (kernels/multi.py): BGMV (gather) for decode-sized batches,
  SGMV (rows grouped by a device-side sort) for prefill, both fused into the
  base GEMM's epilogue; a grouped gradient kernel; each adapter's own
  lora_dropout in training; no host synchronisation.
* C3A and sparse adapters in a mixed batch: the LoRA kernel serves their rows
  with the base (their slot has rank 0), and their delta is added after. For
  inference on decode-sized batches, one Triton launch adds every such row's
  delta (fusedlora.weight_delta_rows). Otherwise per adapter in PyTorch (C3A by
  FFT, O(rows * N * K / b); sparse by a weighted embedding_bag, O(rows * nnz));
  differentiable by autograd. The rows: a slice of one device sort when
  validation counted them on the host (``multi.c3a_delta:torch:sorted``), else
  all rows masked (no sync: ``:masked``; the torch backend picks them with
  nonzero: ``:gathered``). docs/multi.md.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import cdiv, dispatch, interpreting, record, scoped_setting
from .ops import (autocast_inputs, backward_backend, bias_grad, drawn_mask_family, dtype_fallback, fused_op,
                  note_mask_family, pick, register_autograd, seed_value, torch_masks, triton_dtype_ok)

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# Batches of more than this many rows take the segmented (SGMV) path: a sort
# of the rows by adapter pays off once tiles of rows can share an adapter.
# Under the interpreter (tiles of 16) the threshold is low so that tests
# at shapes of tens cover both paths. Tests may patch these.
SORT_MIN_ROWS_GPU = 64
SORT_MIN_ROWS_INTERPRET = 16
# A sorted tile that meets more segments than this runs the per-row gather
# instead of one tensor-core dot per segment. The shrink (row-sized gathers)
# uses it on the GPU too; the base GEMM's epilogue only under the interpreter
# (0: always a dot per segment), as its 128 x 256 tiles would spill the
# gather's pointer tiles.
SEG_DOT_MAX_GPU = 8
SEG_DOT_MAX_INTERPRET = 2


# Products of more rows than this run the layer's base GEMM on cuBLAS (the forward's
# F.linear, the backward's dY W and dY^T x) and add the adapters' terms into its output with
# the SGMV/BGMV kernels (`_add_terms`: the shrink's u times each row's pool rows, one read
# and write of the output): on the H200 our Triton GEMM took 1.3-1.4x cuBLAS's time at
# 4096 x 4096 x 4096 (backend.EAGER_WINS' note), more than the extra pass over y costs
# (~17 us there). At most this many rows, the fused kernels (the base GEMM with the
# adapters in its epilogue, or the decode pair). use_fused_base() turns the split off.
CUBLAS_BASE_ROWS = _CUBLAS_BASE_ROWS = 16


def use_fused_base(on: bool = True):
    """The fused GEMM at every row count (on) or above CUBLAS_BASE_ROWS' 16 rows as well
    (off) for the calls in this scope, process-wide: the bench's A/B."""
    return scoped_setting(__name__, "CUBLAS_BASE_ROWS", 1 << 62 if on else _CUBLAS_BASE_ROWS)


def sort_min_rows() -> int:
    return SORT_MIN_ROWS_INTERPRET if interpreting() else SORT_MIN_ROWS_GPU


def _seg_dot_max(epilogue: bool = False) -> int:
    if interpreting():
        return SEG_DOT_MAX_INTERPRET
    return 0 if epilogue else SEG_DOT_MAX_GPU


# ------------------------------------------------------------------- routing
@dataclass
class Routing:
    """Rows grouped by slot (device tensors, no host sync): perm (sorted position -> row),
    slots (sorted position -> its slot, ascending: -1 rows first) and ends (ends[s + 1] = one
    past the last position of slot s, ends[0] that of the -1 rows). A run of one slot is a
    segment; a kernel walks the segments of its tile from one to the next through ends."""

    perm: Tensor
    slots: Tensor
    ends: Tensor

    @property
    def start(self) -> Tensor:  # slot -> its first position (the gradient kernel's view)
        return self.ends[:-1]

    @property
    def end(self) -> Tensor:  # slot -> one past its last position
        return self.ends[1:]


def route(row_slot: Tensor, num_slots: int) -> Routing:
    """Stable device-side sort of the rows by slot (-1 rows first) and where each slot's
    rows end: a sort and a searchsorted (four launches with the bins' arange and perm's
    cast), no host sync. The arange is not cached: made during torch.compile's CUDA-graph
    warm-up, a kept tensor would live in the graphs' private pool, which may hand it out again."""
    sorted_slot, perm = torch.sort(row_slot, stable=True)
    bins = torch.arange(-1, num_slots, dtype=sorted_slot.dtype, device=row_slot.device)
    ends = torch.searchsorted(sorted_slot, bins, right=True, out_int32=True)
    return Routing(perm.to(torch.int32), sorted_slot, ends)


# Row slots that the layers of one forward pass share (routing.layer_forward under
# use_adapters hands each layer of the pass the same tensor): their sort is computed by the
# first layer and reused. Only tensors made and marked by routing (never a caller's, which
# could be changed in place) are shared; an entry leaves with its tensor.
_SHARED: Dict[int, list] = {}  # id(row_slot) -> [weak reference to it, {plan key: plan} (its Routing, ...)]


def share_routing(row_slot: Tensor) -> None:
    key = id(row_slot)
    _SHARED[key] = [weakref.ref(row_slot, lambda _ref, key=key: _SHARED.pop(key, None)), {}]


def shared_plan(row_slot: Tensor, key: tuple, build):
    """build(), computed once per ``key`` for a shared row_slot (every call otherwise). ``key``
    names what else the plan reads: tensors by id (the plan must hold them, so that no id is
    reused while it is kept; routing's tables are shared by content, never written in place),
    sizes by value."""
    entry = _SHARED.get(id(row_slot))
    if entry is None or entry[0]() is not row_slot:
        return build()
    plan = entry[1].get(key)
    if plan is None:
        plan = entry[1][key] = build()
    return plan


def routing_of(row_slot: Tensor, num_slots: int) -> Routing:
    """route(row_slot, num_slots), computed once for a shared row_slot."""
    return shared_plan(row_slot, ("route", num_slots), lambda: route(row_slot, num_slots))


# ------------------------------------------------------------------ launchers
@functools.lru_cache(maxsize=None)
def _tuned_matmul():
    import triton

    from .kernels.multi import multi_matmul_kernel
    from .launch import _GEMM_CONFIGS, _INTERPRET_TILE, autotuned

    if interpreting():
        configs = [triton.Config(dict(_INTERPRET_TILE, BLOCK_R=16))]
    else:
        configs = [triton.Config({**c.kwargs, "BLOCK_R": 16}, num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in _GEMM_CONFIGS]
    return autotuned(multi_matmul_kernel, configs, ["M_BUCKET", "N", "K", "R_MAX"])


@dataclass
class _Slots:
    """Per-slot device tables handed to the launchers, and the dropout of this call."""

    off: Tensor
    rank: Tensor
    scale: Tensor
    drop: Tensor
    dropout: bool
    seed: int


def _meta(routing: Optional[Routing], dummy: Tensor):
    if routing is None:
        return dummy, dummy, dummy
    return routing.perm, routing.slots, routing.ends


def _shrink(x: Tensor, pool: Tensor, row_slot: Tensor, sl: _Slots, max_rank: int, routing: Optional[Routing],
            dropout: bool, tag: str) -> Tensor:
    """u[m, :rank] = scale * drop(x[m]) P[slot]^T, float32 (M x max_rank), rows in natural order."""
    from .kernels.multi import multi_shrink_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype, split_k

    M, K = x.shape
    u = torch.zeros((M, max_rank), device=x.device, dtype=torch.float32)
    if M == 0 or K == 0 or max_rank == 0:
        return u
    sorted_ = routing is not None
    if interpreting():
        block_m, block_r, block_k, warps = 16, 16, 16, 4
    elif sorted_:
        block_m, block_r, block_k, warps = 64, min(64, _pow2_at_least(max_rank)), 64, 4
    else:
        block_m, block_r, block_k, warps = 1, 16, 256, 4
    rows = cdiv(M, block_m) if sorted_ else M
    r_chunks = cdiv(max_rank, block_r)
    split = split_k(rows * r_chunks, cdiv(K, block_k), x.device)
    perm, sorted_slots, ends = _meta(routing, row_slot)
    multi_shrink_kernel[(rows, r_chunks, split)](
        x, pool, u, row_slot, perm, sorted_slots, ends, sl.off, sl.rank, sl.scale, sl.drop, M, K, sl.rank.shape[0],
        x.stride(0), x.stride(1), pool.stride(0), pool.stride(1), u.stride(0), u.stride(1), sl.seed,
        DOT_DTYPE=_tl_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype), SORTED=sorted_, DROPOUT=dropout,
        SEG_DOT_MAX=_seg_dot_max() or block_m + 1, SPLIT_K=split, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=warps)
    record(tag, "triton", "sgmv" if sorted_ else "bgmv")
    return u


def _matmul(a: Tensor, b: Tensor, bias: Optional[Tensor], u: Tensor, q: Tensor, row_slot: Tensor, sl: _Slots,
            routing: Optional[Routing], drop_epi: bool, out_dtype: torch.dtype, tag: str) -> Tensor:
    """C[m] = a[m] @ b + bias + drop?(u[m, :rank] @ q[off : off + rank]) (slot of row m)."""
    from .kernels.multi import multi_matmul_kernel
    from .launch import _input_precision, _pow2_at_least, _small_plan, _tl_dtype, bias_arg

    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        c = torch.zeros((M, N), device=a.device, dtype=out_dtype)
        return c + bias if bias is not None else c
    sorted_ = routing is not None
    plan = _small_plan(M, N, K, a.device, a.dtype.itemsize)
    split = plan["SPLIT_K"] if plan else 1
    c = (torch.zeros if split > 1 else torch.empty)(
        (M, N), device=a.device, dtype=torch.float32 if split > 1 else out_dtype)
    perm, sorted_slots, ends = _meta(routing, row_slot)
    args = (a, b, c, bias_arg(bias, c), u, q,
            row_slot, perm, sorted_slots, ends, sl.off, sl.rank,
            sl.drop, M, N, K, sl.rank.shape[0], _pow2_at_least(M, 1), _pow2_at_least(u.shape[1], 1),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            u.stride(0), u.stride(1), q.stride(0), q.stride(1), sl.seed)
    flags = dict(HAS_BIAS=bias is not None, DROP_EPI=drop_epi, DOT_DTYPE=_tl_dtype(a.dtype),
                 INPUT_PRECISION=_input_precision(a.dtype), SORTED=sorted_, SEG_DOT_MAX=_seg_dot_max(epilogue=True))
    path = "sgmv" if sorted_ else "bgmv"
    if plan is None:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
        _tuned_matmul()[grid](*args, **flags, SPLIT_K=1)
        record(tag, "triton", path)
    else:
        grid = (cdiv(M, plan["BLOCK_M"]) * cdiv(N, plan["BLOCK_N"]), split)
        multi_matmul_kernel[grid](*args, **flags, **plan, BLOCK_R=16)
        record(tag, "triton", f"{path}-splitk" if split > 1 else path)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _add_terms(c: Tensor, u: Tensor, q: Tensor, row_slot: Tensor, sl: _Slots, routing: Optional[Routing],
               drop_epi: bool, tag: str, variant: str = "") -> None:
    """c[m] += drop?(u[m, :rank] @ q[off : off + rank]) for each row's slot, in place: the
    multi_matmul_kernel with an empty base loop (K = 0) and ADD_C, so each output tile is read
    and written once (c is the base product computed elsewhere)."""
    from .kernels.multi import multi_matmul_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype

    M, N = c.shape
    sorted_ = routing is not None
    if interpreting():
        block_m, block_n = 16, 16
    else:  # the sorted tiles run a tensor-core dot per segment; the gather tiles, rank-1 updates per row
        block_m, block_n = (64, 128) if sorted_ else (16, 128)
    perm, sorted_slots, ends = _meta(routing, row_slot)
    grid = (cdiv(M, block_m) * cdiv(N, block_n), 1)
    # K = 0: a and b (here c and q) are never read
    multi_matmul_kernel[grid](
        c, q, c, c, u, q, row_slot, perm, sorted_slots, ends, sl.off, sl.rank, sl.drop,
        M, N, 0, sl.rank.shape[0], _pow2_at_least(M, 1), _pow2_at_least(u.shape[1], 1),
        c.stride(0), c.stride(1), q.stride(0), q.stride(1), c.stride(0), c.stride(1),
        u.stride(0), u.stride(1), q.stride(0), q.stride(1), sl.seed,
        HAS_BIAS=False, DROP_EPI=drop_epi, DOT_DTYPE=_tl_dtype(c.dtype), INPUT_PRECISION=_input_precision(c.dtype),
        SORTED=sorted_, SEG_DOT_MAX=_seg_dot_max(epilogue=True), SPLIT_K=1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, BLOCK_R=16, GROUP_M=8, ADD_C=True, num_warps=4)
    record(tag, "triton", variant + ("sgmv" if sorted_ else "bgmv"))


def _decode_pair(x: Tensor, weight: Tensor, bias: Optional[Tensor], pool_A: Tensor, pool_BT: Tensor,
                 row_slot: Tensor, sl: _Slots, max_rank: int) -> Tuple[Tensor, Tensor]:
    """(y, u) of a BGMV forward of 1..16 rows without dropout in two launches and no memset
    (kernels/multi.py, decode): the per-row shrink runs in the base GEMM's split-K grid."""
    from .kernels.multi import multi_decode_finish_kernel, multi_decode_kernel
    from .launch import _input_precision, _tl_dtype, bias_arg, decode_plan

    M, K = x.shape
    N = weight.shape[0]
    plan = decode_plan(x, N)
    split = plan["SPLIT_K"]
    shrink_k, finish_n, finish_r = (16, 16, 8) if interpreting() else (256, 32, 8)
    r_chunks, n_tiles = cdiv(max_rank, 16), cdiv(N, plan["BLOCK_N"])
    part = torch.empty((split, M, max_rank + N), device=x.device, dtype=torch.float32)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, max_rank), device=x.device, dtype=torch.float32)
    multi_decode_kernel[((M * r_chunks + n_tiles) * split,)](
        x, weight, pool_A, part, row_slot, sl.off, sl.rank, sl.scale, sl.drop, M, N, K, max_rank, r_chunks,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), pool_A.stride(0), pool_A.stride(1),
        part.stride(0), part.stride(1), DOT_DTYPE=_tl_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        **plan, BLOCK_R=16, SHRINK_BLOCK_K=shrink_k)
    multi_decode_finish_kernel[(cdiv(N, finish_n),)](
        part, pool_BT, bias_arg(bias, y), u, y, row_slot, sl.off, sl.rank,
        M, N, max_rank, max_rank, part.stride(0), part.stride(1), pool_BT.stride(0), pool_BT.stride(1),
        u.stride(0), y.stride(0), y.stride(1), HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=plan["BLOCK_M"], BLOCK_N=finish_n, BLOCK_R=finish_r, num_warps=4)
    record("multi.forward", "triton", "bgmv-decode")
    return y, u


def _grouped_grad(left: Tensor, right: Tensor, routing: Routing, sl: _Slots, pool_rows: int, max_rank: int,
                  drop_right: bool, out_dtype: torch.dtype, tag: str) -> Tensor:
    """out[off[s] + j, n] = sum over rows m of slot s of left[m, j] * drop?(right)[m, n]; pool-shaped."""
    from .kernels.multi import multi_grad_kernel
    from .launch import _input_precision, _target_programs, _tl_dtype

    M, N = right.shape
    out = torch.zeros((pool_rows, N), device=right.device, dtype=torch.float32)
    S = sl.rank.shape[0]
    if M == 0 or N == 0 or max_rank == 0 or pool_rows == 0 or S == 0:
        return out.to(out_dtype)
    block_m, block_n, block_r = (16, 16, 16) if interpreting() else (64, 128, 16)
    r_chunks = cdiv(max_rank, block_r)
    n_tiles = cdiv(N, block_n)
    programs = S * r_chunks * n_tiles
    split = max(1, min(cdiv(M, block_m), cdiv(_target_programs(right.device), programs)))
    multi_grad_kernel[(S * r_chunks, n_tiles, split)](
        left, right, out, routing.perm, routing.start, routing.end, sl.off, sl.rank, sl.drop, N, r_chunks,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1), sl.seed,
        DROP_R=drop_right, DOT_DTYPE=_tl_dtype(right.dtype), INPUT_PRECISION=_input_precision(right.dtype),
        SPLIT_M=min(split, 2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)  # 2 = "split": one variant
    record(tag, "triton", "grouped")
    return out.to(out_dtype)


# ------------------------------------------------------------- torch backend
def _torch_keep(shape, seed: int, device) -> Tensor:
    """Uniform draws of the torch backend's dropout for x of ``shape``; row m keeps (m, k)
    where the draw is >= its slot's probability. A pure function of the seed: the
    backward draws it again instead of storing a mask."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device)


def _groups(row_slot: Tensor, sl: _Slots):
    """(rows, off, rank, scale, p) of each LoRA slot that has rows: the torch backend groups
    rows by adapter on the host, as PEFT's mixed batch does (host syncs are fine on this path)."""
    offs, ranks, scales, drops = sl.off.tolist(), sl.rank.tolist(), sl.scale.tolist(), sl.drop.tolist()
    for s in torch.unique(row_slot).tolist():
        if s >= 0 and ranks[s] > 0:
            yield torch.nonzero(row_slot == s).squeeze(1), offs[s], ranks[s], scales[s], drops[s]


def _dropped(xs: Tensor, draws: Optional[Tensor], rows: Tensor, p: float) -> Tensor:
    if draws is None or p == 0.0:
        return xs
    return xs * (draws.index_select(0, rows) >= p).to(xs.dtype) / (1.0 - p)


def _torch_forward(x, weight, bias, pool_A, pool_BT, row_slot, sl: _Slots, max_rank):
    y = F.linear(x, weight, bias)
    u = torch.zeros((x.shape[0], max_rank), device=x.device, dtype=torch.float32)
    draws = _torch_keep(x.shape, sl.seed, x.device) if sl.dropout else None
    for rows, o, r, c, p in _groups(row_slot, sl):
        us = c * (_dropped(x.index_select(0, rows), draws, rows, p) @ pool_A[o:o + r].t())
        y.index_add_(0, rows, us @ pool_BT[o:o + r])
        u[rows, :r] = us.float()
    return y, u


def _gather_forward(x, weight, bias, pool_A, pool_BT, row_slot, sl: _Slots, max_rank):
    """The eager composition of up to 16 rows (no dropout): each row gathers max_rank rows of
    the pools from its slot's offset, then two batched products. No host sync; about twenty
    launches, 8 for the later layers of a use_adapters pass (the per-row plan is shared), where
    the Triton path's launches cost 3-4x more host time per eager call at decode sizes
    (backend.HOST_WINS). Rows past a slot's rank (another adapter's, maybe
    non-finite) are selected away, never multiplied by zero."""
    y = F.linear(x, weight, bias)
    if max_rank == 0 or x.shape[0] == 0 or pool_A.shape[0] == 0:
        return y, torch.zeros((x.shape[0], max_rank), device=x.device, dtype=torch.float32)
    acc = torch.promote_types(x.dtype, torch.float32)

    def plan():  # ~10 small launches, once per forward pass for the layers sharing row_slot and tables
        slot = row_slot.long()
        live = slot >= 0
        s = slot.clamp(min=0)
        j = torch.arange(max_rank, device=x.device)
        keep = j < torch.where(live, sl.rank.long()[s], 0)[:, None]                        # (M, R)
        idx = (sl.off.long()[s][:, None] + j).clamp(max=pool_A.shape[0] - 1).reshape(-1)  # rows of the pools
        return keep, ~keep[:, :, None], idx, sl.scale.to(acc)[s][:, None], (sl.off, sl.rank, sl.scale)  # held: ids key it

    key = ("gather", id(sl.off), id(sl.rank), id(sl.scale), max_rank, pool_A.shape[0], acc)
    keep, past_rank, idx, row_scale, _ = shared_plan(row_slot, key, plan)
    M = x.shape[0]
    a = pool_A.index_select(0, idx).view(M, max_rank, -1)                 # (M, R, K)
    xa = torch.bmm(a, x[:, :, None])[:, :, 0].to(acc) * row_scale
    u = torch.where(keep, xa, 0)
    bt = pool_BT.index_select(0, idx).view(M, max_rank, -1).masked_fill(past_rank, 0)
    y.view(M, 1, -1).baddbmm_(u.to(x.dtype)[:, None, :], bt)  # y is F.linear's, fresh: added in place
    return y, u.float()


def _torch_backward(grad_y, x, weight, pool_A, pool_BT, row_slot, sl: _Slots):
    """(dx, dW, db, d pool_A, d pool_BT): reference.multi_lora_linear_grads, one group at a time."""
    dx, dW, db = grad_y @ weight, grad_y.t() @ x, grad_y.sum(0)
    dA, dBT = torch.zeros_like(pool_A), torch.zeros_like(pool_BT)
    draws = _torch_keep(x.shape, sl.seed, x.device) if sl.dropout else None
    for rows, o, r, c, p in _groups(row_slot, sl):
        gy = grad_y.index_select(0, rows)
        xs = _dropped(x.index_select(0, rows), draws, rows, p)
        A, BT = pool_A[o:o + r], pool_BT[o:o + r]
        g = c * (gy @ BT.t())
        dx.index_add_(0, rows, _dropped(g @ A, draws, rows, p))
        dA[o:o + r] = g.t() @ xs
        dBT[o:o + r] = (c * (xs @ A.t())).t() @ gy
    return dx, dW, db, dA, dBT


# ----------------------------------------------------------------- custom ops
@fused_op("fusedlora::multi_lora_linear")
def _multi_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], pool_A: Tensor, pool_BT: Tensor,
                   row_slot: Tensor, slot_off: Tensor, slot_rank: Tensor, slot_scale: Tensor, slot_drop: Tensor,
                   max_rank: int, dropout: bool, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """2-D x -> (y, u): y[m] = x[m] W^T + b + u[m] P_B[slot[m]], u = scale * drop(x) P_A^T
    (float32, saved for backward); dropout (if ``dropout``) with each slot's probability."""
    return dispatch("multi.forward", _multi_forward_on, x, weight, bias, pool_A, pool_BT, row_slot, slot_off,
                    slot_rank, slot_scale, slot_drop, max_rank, dropout, seed,
                    host_ok=not dropout)  # the extension has no dropout


def _multi_forward_on(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], pool_A: Tensor,
                      pool_BT: Tensor, row_slot: Tensor, slot_off: Tensor, slot_rank: Tensor, slot_scale: Tensor,
                      slot_drop: Tensor, max_rank: int, dropout: bool, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    sl = _Slots(slot_off, slot_rank, slot_scale, slot_drop, dropout, seed_value(seed) if dropout else 0)
    backend = dtype_fallback(backend, x.device, x.dtype)  # float64 under auto: the gather or the grouped form
    if dropout:  # the gather and the extension have no dropout: torch's grouped form, or Triton's kernels
        note_mask_family(sl.seed, x, backend in ("torch", "eager"))
    # the gather has no dropout, and pads every row to max_rank: decode rows only
    if backend == "torch" or (backend == "eager" and (dropout or x.shape[0] > 16)):
        record("multi.forward", "torch", "grouped")
        return _torch_forward(x, weight, bias, pool_A, pool_BT, row_slot, sl, max_rank)
    if backend == "eager":
        record("multi.forward", "eager", "gather")
        return _gather_forward(x, weight, bias, pool_A, pool_BT, row_slot, sl, max_rank)
    if backend == "cuda":
        from .cuda_ext import decode_serves

        # the binding's contract: decode_serves, and unit stride along the pools' rows
        if decode_serves(x, weight) and not dropout and pool_A.stride(1) == 1 and pool_BT.stride(1) == 1:
            from .cuda_ext import gemv_for, load

            gemv = gemv_for("multi.forward", "bgmv", x, weight)
            return load().multi_lora_decode(x, weight, bias, row_slot, pool_A, pool_BT, slot_off, slot_rank,
                                            slot_scale, int(max_rank), gemv=gemv)
        # the extension has no kernel for these rows, dropout or strides: Triton, recorded below
    triton_dtype_ok(x)
    from .launch import decode_pair_serves

    if decode_pair_serves(x, weight, dropout) and x.shape[0] <= sort_min_rows():
        return _decode_pair(x, weight, bias, pool_A, pool_BT, row_slot, sl, max_rank)
    routing = routing_of(row_slot, slot_rank.shape[0]) if x.shape[0] > sort_min_rows() else None
    u = _shrink(x, pool_A, row_slot, sl, max_rank, routing, dropout, "multi.shrink")
    if x.shape[0] > CUBLAS_BASE_ROWS and weight.shape[0] > 0:
        y = F.linear(x, weight, bias)
        _add_terms(y, u, pool_BT, row_slot, sl, routing, False, "multi.forward", "cublas+")
        return y, u
    y = _matmul(x, weight.t(), bias, u, pool_BT, row_slot, sl, routing, False, x.dtype, "multi.forward")
    return y, u


@_multi_forward.register_fake
def _(x, weight, bias, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, slot_drop, max_rank, dropout,
      seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], max_rank), dtype=torch.float32))


@fused_op("fusedlora::multi_lora_linear_backward")
def _multi_backward(grad_y: Tensor, x: Tensor, weight: Tensor, pool_A: Tensor, pool_BT: Tensor, u: Tensor,
                    row_slot: Tensor, slot_off: Tensor, slot_rank: Tensor, slot_scale: Tensor, slot_drop: Tensor,
                    max_rank: int, dropout: bool, seed: Optional[Tensor], torch_mask: bool, needs: List[bool]) -> List[Tensor]:
    """(dx, dW, db, d pool_A, d pool_BT); an empty tensor stands for a gradient not asked for.
    ``torch_mask``: the forward drew its dropout from torch's generator (ops.torch_masks)."""
    need_x, need_w, need_b, need_a, need_bb = needs
    sl = _Slots(slot_off, slot_rank, slot_scale, slot_drop, dropout, seed_value(seed) if dropout else 0)
    if dropout:
        torch_mask = drawn_mask_family(sl.seed, x, torch_mask)
    backend = backward_backend(x.device, dropout, torch_mask, dtype=x.dtype, fallback="torch")
    if backend == "torch":
        record("multi.backward", "torch", "grouped")
        grads = _torch_backward(grad_y, x, weight, pool_A, pool_BT, row_slot, sl)
        return [g if n else grad_y.new_empty(0) for g, n in zip(grads, needs)]
    triton_dtype_ok(x)
    from .launch import matmul

    dt = x.dtype
    M = x.shape[0]
    dx, dW, db, dA, dBT = (grad_y.new_empty(0) for _ in range(5))
    sort_rows = M > sort_min_rows()
    routing = routing_of(row_slot, slot_rank.shape[0]) if M > 0 and (need_a or need_bb or sort_rows) else None
    g = None
    if need_x or need_a:
        g = _shrink(grad_y, pool_BT, row_slot, sl, max_rank, routing if sort_rows else None, False,
                    "multi.grad_shrink")
    cublas = M > CUBLAS_BASE_ROWS
    if need_x and cublas and x.shape[1] > 0:
        dx = grad_y @ weight
        _add_terms(dx, g, pool_A, row_slot, sl, routing if sort_rows else None, dropout, "multi.grad_x", "cublas+")
    elif need_x:
        dx = _matmul(grad_y, weight, None, g, pool_A, row_slot, sl, routing if sort_rows else None, dropout, dt,
                     "multi.grad_x")
    if need_w and cublas:
        dW = (grad_y.t() @ x).to(weight.dtype)
        record("multi.grad_weight", "eager", "cublas")
    elif need_w:
        dW = matmul(grad_y.t(), x, out_dtype=weight.dtype, dot_dtype=dt, tag="multi.grad_weight")
    if need_b:
        db = bias_grad(grad_y, dt)
    if need_a:
        dA = (_grouped_grad(g, x, routing, sl, pool_A.shape[0], max_rank, dropout, pool_A.dtype, "multi.grad_A")
              if routing is not None else torch.zeros_like(pool_A))
    if need_bb:
        dBT = (_grouped_grad(u, grad_y, routing, sl, pool_BT.shape[0], max_rank, False, pool_BT.dtype,
                             "multi.grad_B") if routing is not None else torch.zeros_like(pool_BT))
    return [dx, dW, db, dA, dBT]


@_multi_backward.register_fake
def _(grad_y, x, weight, pool_A, pool_BT, u, row_slot, slot_off, slot_rank, slot_scale, slot_drop, max_rank,
      dropout, seed, torch_mask, needs):
    shapes = [x, weight, weight[:, 0], pool_A, pool_BT]
    return [t.new_empty(t.shape) if n else grad_y.new_empty(0) for t, n in zip(shapes, needs)]


def _multi_setup_context(ctx, inputs, output):
    (x, weight, bias, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, slot_drop, max_rank, dropout,
     seed) = inputs
    ctx.save_for_backward(x, weight, pool_A, pool_BT, output[1], row_slot, slot_off, slot_rank, slot_scale,
                          slot_drop, seed)
    ctx.max_rank, ctx.dropout = max_rank, dropout
    ctx.torch_mask = dropout and torch_masks(x.device, "multi.forward", x.shape[0], x.dtype)
    ctx.mark_non_differentiable(output[1])


def _multi_autograd(ctx, grad_y, grad_u):
    x, weight, pool_A, pool_BT, u, row_slot, slot_off, slot_rank, slot_scale, slot_drop, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4]]
    backward = pick(_multi_backward, grad_y, x, weight, pool_A, pool_BT, u)
    grads = backward(grad_y, x, weight, pool_A, pool_BT, u, row_slot, slot_off, slot_rank, slot_scale,
                     slot_drop, ctx.max_rank, ctx.dropout, seed, ctx.torch_mask, needs)
    dx, dW, db, dA, dBT = (g if need else None for g, need in zip(grads, needs))
    return dx, dW, db, dA, dBT, None, None, None, None, None, None, None, None


register_autograd(_multi_forward, _multi_autograd, _multi_setup_context)


def check_multi_args(x, weight, bias, row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale,
                     slot_drop=None) -> None:
    from .ops import check_linear_args

    check_linear_args(x, weight, bias)
    if x.dim() != 2:  # one row_slot entry per row: the functional form takes rows, as the kernels do
        raise ValueError(f"x: expected a 2-D (rows, in_features) tensor (one row_slot entry per row), "
                         f"got shape {tuple(x.shape)}")
    check_pools_and_tables(x, weight.shape[0], row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale, slot_drop)


def check_pools_and_tables(x, N, row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale, slot_drop=None) -> None:
    """The pools' shapes, dtypes and devices against 2-D x and N output features, and the tables'."""
    from .ops import _check_same, _check_tensor

    K = x.shape[1]
    for name, t, cols in (("pool_A", pool_A, K), ("pool_BT", pool_BT, N)):
        _check_tensor(name, t, 2)
        _check_same(name, t, x)
        if t.shape[1] != cols:
            raise ValueError(f"{name}: expected shape (R_total, {cols}), got {tuple(t.shape)}")
    if pool_A.shape[0] != pool_BT.shape[0]:
        raise ValueError(f"pool_BT: expected {pool_A.shape[0]} rows like pool_A, got {tuple(pool_BT.shape)}")
    tables = [("row_slot", row_slot, torch.int32), ("slot_off", slot_off, torch.int32),
              ("slot_rank", slot_rank, torch.int32), ("slot_scale", slot_scale, torch.float32)]
    if slot_drop is not None:
        tables.append(("slot_drop", slot_drop, torch.float32))
    for name, t, dt in tables:
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 1:
            raise TypeError(f"{name}: expected a 1-D {dt} tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{name}: device {t.device} does not match x's device {x.device}")
    if row_slot.shape[0] != x.shape[0]:
        raise ValueError(f"row_slot: expected one slot per row of x ({x.shape[0]}), got {row_slot.shape[0]}")
    if not (slot_off.shape == slot_rank.shape == slot_scale.shape) or \
            (slot_drop is not None and slot_drop.shape != slot_off.shape):
        raise ValueError("slot_off, slot_rank, slot_scale, slot_drop: expected the same length (one entry per slot)")


SHARED_ROWS = ("slot_off, slot_rank: two slots share pool rows; give each slot its own rows (copy an adapter "
               "used at two scales)")


def _shared_pool_rows(slot_off: Tensor, slot_rank: Tensor) -> Tensor:
    """Whether two slots of nonzero rank own overlapping pool rows (a 0-d bool tensor, no host
    sync, no data-dependent shapes). The pools' gradients are written slot by slot, so such
    slots would overwrite each other's; their forward is right (fine for inference)."""
    big = torch.iinfo(torch.int64).max
    used = slot_rank > 0
    off = torch.where(used, slot_off.long(), big)
    end = torch.where(used, slot_off.long() + slot_rank.long(), big)
    order = torch.argsort(off)
    off, end = off[order], end[order]
    return ((end[:-1] > off[1:]) & (off[1:] != big)).any()


def _check_table_values(row_slot, slot_off, slot_rank, slot_drop, pool_rows: int, max_rank,
                        pools_need_grad: bool = False) -> int:
    """Values of caller-built tables (one host sync): the kernels index the pools
    and size their buffers by them, so an entry out of range would read or write
    out of bounds. Returns max_rank. Under torch.compile the same checks run as device-side
    asserts (no sync, no graph break), and max_rank, which sizes buffers, must be given."""
    S = slot_off.shape[0]
    if torch.compiler.is_compiling():
        if max_rank is None:
            raise ValueError("max_rank: under torch.compile pass the largest slot rank (an int): reading it "
                             "from slot_rank would synchronise with the host")
        if int(max_rank) < 0:
            raise ValueError(f"max_rank: expected >= 0, got {max_rank}")
        if row_slot.numel():
            torch._assert_async(((row_slot >= -1) & (row_slot < S)).all(), "row_slot: a slot out of range")
        if S:
            ok = (slot_rank >= 0) & (slot_off >= 0) & (slot_off.long() + slot_rank.long() <= pool_rows)
            torch._assert_async((ok & (slot_rank <= max_rank)).all(),
                                "slot_off, slot_rank: a slot outside the pool, or above max_rank")
        if slot_drop is not None and S:
            torch._assert_async(((slot_drop >= 0) & (slot_drop < 1)).all(), "slot_drop: expected [0, 1)")
        if S > 1 and pools_need_grad:
            torch._assert_async(~_shared_pool_rows(slot_off, slot_rank), SHARED_ROWS)
        return int(max_rank)
    if row_slot.numel() and (int(row_slot.min()) < -1 or int(row_slot.max()) >= S):
        raise ValueError(f"row_slot: expected slots in -1 .. {S - 1}, got {int(row_slot.min())} .. "
                         f"{int(row_slot.max())}")
    if S and (int(slot_rank.min()) < 0 or int(slot_off.min()) < 0
              or int((slot_off.long() + slot_rank.long()).max()) > pool_rows):
        raise ValueError(f"slot_off, slot_rank: every slot must own rows inside the pool's {pool_rows} rows "
                         f"(offsets >= 0, ranks >= 0, offset + rank <= {pool_rows})")
    if slot_drop is not None and S and (float(slot_drop.min()) < 0 or float(slot_drop.max()) >= 1):
        raise ValueError("slot_drop: expected dropout probabilities in [0, 1)")
    if S > 1 and pools_need_grad and bool(_shared_pool_rows(slot_off, slot_rank)):
        raise ValueError(SHARED_ROWS)
    true_max = int(slot_rank.max()) if S else 0
    if max_rank is not None and int(max_rank) < true_max:
        raise ValueError(f"max_rank: {max_rank} is below the largest slot_rank {true_max}")
    return true_max if max_rank is None else int(max_rank)


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], row_slot: Tensor, pool_A: Tensor,
                      pool_BT: Tensor, slot_off: Tensor, slot_rank: Tensor, slot_scale: Tensor,
                      max_rank: Optional[int] = None, slot_drop: Optional[Tensor] = None) -> Tensor:
    """y[m] = x[m] W^T + b + scale[s] (drop_s(x[m]) A_s^T) B_s^T with s = row_slot[m] (-1: base only).

    The pooled functional form (FusedLinear's ``adapter_ids`` builds these
    arguments for you; ``pack_loras`` builds them from lists): adapter slot s
    owns rows slot_off[s] .. + slot_rank[s] - 1 of ``pool_A`` (its A) and of
    ``pool_BT`` (its B^T). x is 2-D (M, K); row_slot int32 (M,); slot_off,
    slot_rank int32 and slot_scale float32, one entry per slot. Slots must be
    in range (-1 .. S-1): FusedLinear validates ids before they get here.
    ``max_rank`` (largest slot_rank, host int) avoids a sync when given.
    ``slot_drop`` (float32 per slot): inverted dropout of each slot's adapter
    input, drawn from a seed of torch's CPU generator, as ``ops.lora_linear``.
    Differentiable in x, weight, bias and both pools. Under ``torch.autocast``, x, W, b and
    the pools are cast to the autocast dtype as ``F.linear``'s inputs are.
    """
    x, weight, bias, pool_A, pool_BT = autocast_inputs(x, weight, bias, pool_A, pool_BT)
    check_multi_args(x, weight, bias, row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale, slot_drop)
    # the kernels (and the CUDA extension) index the tables with unit stride
    row_slot, slot_off, slot_rank, slot_scale = (t.contiguous() for t in (row_slot, slot_off, slot_rank, slot_scale))
    slot_drop = slot_drop.contiguous() if slot_drop is not None else None
    max_rank = _check_table_values(row_slot, slot_off, slot_rank, slot_drop, pool_A.shape[0], max_rank,
                                   torch.is_grad_enabled() and (pool_A.requires_grad or pool_BT.requires_grad))
    from .ops import draw_seed

    if torch.compiler.is_compiling():  # whether any slot drops is data: traced as "maybe" (p = 0 keeps all)
        p_max = 0.5 if slot_drop is not None else 0.0
    else:
        p_max = float(slot_drop.max()) if slot_drop is not None and slot_drop.numel() else 0.0
    if slot_drop is None:
        slot_drop = torch.zeros_like(slot_scale)
    op = pick(_multi_forward, x, weight, bias, pool_A, pool_BT)
    y, _ = op(x, weight, bias, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, slot_drop,
              int(max_rank), p_max > 0, draw_seed(p_max))
    return y
