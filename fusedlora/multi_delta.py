"""Delta-only multi-adapter LoRA: ``y += scale[s] (x[m] A_s^T) B_s^T`` for each row m with
its own slot s, in place, into a base output computed elsewhere: a quantized GEMM, a
tensor-parallel shard, another library's kernel. This is the split that Punica, S-LoRA
and vLLM make (base by cuBLAS or a quantized kernel, adapters by BGMV/SGMV), over
fusedlora's pool: ranks differ without padding, -1 rows do no adapter work, per-slot
scale, no host synchronisation with ``validate=False``.

    y = quantized_linear(x)                                   # (..., N), x's dtype
    pool_A, pool_BT, off, rank, scale, r_max = fusedlora.routing.pack_loras(As, Bs, scales)
    fusedlora.add_multi_lora_(y, x, row_slot, pool_A, pool_BT, off, rank, scale, r_max)

Two launches on Triton: the shrink ``u = scale * x P_A^T`` (fp32, the forward's kernel)
and ``multi_matmul_kernel`` with an empty reduction and ``ADD_C``, whose epilogue reads
each output tile of y once, adds its rows' adapter terms and writes it back. Rows are
taken in their natural order (BGMV) up to ``multi.sort_min_rows()`` rows, else grouped
by adapter with one device sort (SGMV), as in ``multi_lora_linear``.

Inference only: nothing here records a graph (``multi_lora_linear`` is the trainable
form); asking for gradients through it is an error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import interpreting, record, select_backend
from .multi import (_check_table_values, _groups, _meta, _seg_dot_max, _shrink, _Slots, check_pools_and_tables,
                    route, sort_min_rows)
from .ops import _check_same, _check_tensor, fused_op, pick, triton_dtype_ok


def _expand_into(y: Tensor, x: Tensor, u: Tensor, pool_BT: Tensor, row_slot: Tensor, sl: _Slots,
                 routing) -> None:
    """y[m] += u[m, :rank] @ pool_BT[off : off + rank] for each row's slot, in place."""
    import triton

    from .kernels.multi import multi_matmul_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype

    M, N = y.shape
    sorted_ = routing is not None
    if interpreting():
        block_m, block_n = 16, 16
    else:  # the sorted tiles run a tensor-core dot per segment; the gather tiles, rank-1 updates per row
        block_m, block_n = (64, 128) if sorted_ else (16, 128)
    perm, segid, segstart = _meta(routing, row_slot)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), 1)
    # K = 0: the base loop is empty, a (x) and b (pool_BT) are never read; c = y, read and written
    multi_matmul_kernel[grid](
        x, pool_BT, y, y, u, pool_BT, row_slot, perm, segid, segstart, sl.off, sl.rank, sl.drop,
        M, N, 0, _pow2_at_least(M, 1), _pow2_at_least(u.shape[1], 1),
        x.stride(0), x.stride(1), pool_BT.stride(0), pool_BT.stride(1), y.stride(0), y.stride(1),
        u.stride(0), u.stride(1), pool_BT.stride(0), pool_BT.stride(1), 0,
        HAS_BIAS=False, DROP_EPI=False, DOT_DTYPE=_tl_dtype(y.dtype), INPUT_PRECISION=_input_precision(y.dtype),
        SORTED=sorted_, SEG_DOT_MAX=_seg_dot_max(epilogue=True), SPLIT_K=1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, BLOCK_R=16, GROUP_M=8, ADD_C=True, num_warps=4)
    record("multi.delta", "triton", "sgmv" if sorted_ else "bgmv")


@fused_op("fusedlora::add_multi_lora_", mutates_args=("y",))
def _add_multi_lora(y: Tensor, x: Tensor, pool_A: Tensor, pool_BT: Tensor, row_slot: Tensor, slot_off: Tensor,
                    slot_rank: Tensor, slot_scale: Tensor, max_rank: int) -> None:
    """2-D y (M, N) += each row's adapter term for 2-D x (M, K), in place."""
    if x.shape[0] == 0 or max_rank == 0 or pool_A.shape[0] == 0:
        return
    sl = _Slots(slot_off, slot_rank, slot_scale, torch.zeros_like(slot_scale), False, 0)
    if select_backend(x.device, "multi.delta", x.shape[0]) == "torch":
        acc = torch.promote_types(x.dtype, torch.float32)
        for rows, off, rank, scale, _ in _groups(row_slot, sl):
            u = scale * (x.index_select(0, rows).to(acc) @ pool_A[off:off + rank].to(acc).t())
            y.index_add_(0, rows, (u @ pool_BT[off:off + rank].to(acc)).to(y.dtype))
        record("multi.delta", "torch", "grouped")
        return
    # The extension and the eager compositions have no delta-only form: Triton serves
    # every other backend, and the dispatch table says so.
    triton_dtype_ok(x)
    routing = route(row_slot, slot_rank.shape[0], bounds=False) if x.shape[0] > sort_min_rows() else None
    u = _shrink(x, pool_A, row_slot, sl, max_rank, routing, False, "multi.delta_shrink")
    _expand_into(y, x, u, pool_BT, row_slot, sl, routing)


@_add_multi_lora.register_fake
def _(y, x, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, max_rank):
    return None


def add_multi_lora_(y: Tensor, x: Tensor, row_slot: Tensor, pool_A: Tensor, pool_BT: Tensor, slot_off: Tensor,
                    slot_rank: Tensor, slot_scale: Tensor, max_rank: Optional[int] = None,
                    validate: bool = True) -> Tensor:
    """``y[m] += slot_scale[s] * (x[m] P_A[s]^T) P_BT[s]`` with s = row_slot[m] (-1: nothing),
    in place; returns y. x (..., K) and y (..., N) share their leading shape, dtype and
    device; the pool and tables are those of ``multi_lora_linear`` (``routing.pack_loras``
    builds them). ``validate=False`` skips the checks of the tables' values (one host sync)
    for CUDA-graph capture: ``max_rank`` is then required and out-of-range slots are the
    caller's to prevent. Inference only (no autograd)."""
    _check_tensor("y", y)
    _check_tensor("x", x)
    if x.dim() < 1 or y.dim() != x.dim() or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y: expected the leading shape of x {tuple(x.shape[:-1])} and N columns, got "
                         f"y {tuple(y.shape)} for x {tuple(x.shape)}")
    _check_same("y", y, x)
    K, N = x.shape[-1], y.shape[-1]
    try:
        y2 = y.view(-1, N)
    except RuntimeError:
        raise ValueError(f"y: its rows must be addressable as one (rows, N) view to be added into in place; got "
                         f"strides {y.stride()} for shape {tuple(y.shape)}") from None
    x2 = x.reshape(-1, K)
    check_pools_and_tables(x2, N, row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, x, pool_A, pool_BT)):
        raise ValueError("add_multi_lora_ is inference only: y, x, pool_A and pool_BT must not require grad "
                         "(run it under torch.no_grad(), or train with fusedlora.multi.multi_lora_linear)")
    row_slot, slot_off, slot_rank, slot_scale = (t.contiguous() for t in (row_slot, slot_off, slot_rank, slot_scale))
    if validate:
        max_rank = _check_table_values(row_slot, slot_off, slot_rank, None, pool_A.shape[0], max_rank)
    elif max_rank is None or isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(f"max_rank: validate=False needs the largest slot rank as an int >= 0, got {max_rank!r}")
    op = pick(_add_multi_lora, y2, x2, pool_A, pool_BT)
    op(y2, x2, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, int(max_rank))
    return y
