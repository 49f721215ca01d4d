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

import math
from typing import Optional

import torch
from torch import Tensor

from .backend import record, select_backend
from .multi import (_add_terms, _check_table_values, _groups, _shrink, _Slots, check_pools_and_tables, route,
                    sort_min_rows)
from .ops import _check_same, _check_tensor, autocast_inputs, autocasting, fused_op, pick, rows_of, triton_dtype_ok


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of the 2-D t share memory: a stride 0 along a dimension of 2 or
    more, or (i, j) != (i', j') with i sm + j sn = i' sm + j' sn, which holds exactly when
    sn / g < m and sm / g < n for g = gcd(sm, sn) (traced by torch.compile: the stride-0 test only)."""
    (m, n), (sm, sn) = t.shape, t.stride()
    if m == 0 or n == 0:
        return False
    if (m > 1 and sm == 0) or (n > 1 and sn == 0):
        return True
    if m <= 1 or n <= 1 or torch.compiler.is_compiling():
        return False
    g = math.gcd(sm, sn)
    return sn // g < m and sm // g < n


@fused_op("fusedlora::add_multi_lora_", mutates_args=("y",))
def _add_multi_lora(y: Tensor, x: Tensor, pool_A: Tensor, pool_BT: Tensor, row_slot: Tensor, slot_off: Tensor,
                    slot_rank: Tensor, slot_scale: Tensor, max_rank: int) -> None:
    """2-D y (M, N) += each row's adapter term for 2-D x (M, K), in place."""
    if x.shape[0] == 0 or x.shape[1] == 0 or y.shape[1] == 0 or max_rank == 0 or pool_A.shape[0] == 0:
        return
    sl = _Slots(slot_off, slot_rank, slot_scale, torch.zeros_like(slot_scale), False, 0)
    if select_backend(x.device, "multi.delta", x.shape[0]) == "torch":
        acc = torch.promote_types(x.dtype, torch.float32)
        # every term before the first write: y may share memory with x
        terms = [(rows, scale * (x.index_select(0, rows).to(acc) @ pool_A[off:off + rank].to(acc).t())
                  @ pool_BT[off:off + rank].to(acc)) for rows, off, rank, scale, _ in _groups(row_slot, sl)]
        for rows, term in terms:
            y.index_add_(0, rows, term.to(y.dtype))
        record("multi.delta", "torch", "grouped")
        return
    # The extension and the eager compositions have no delta-only form: Triton serves
    # every other backend, and the dispatch table says so.
    triton_dtype_ok(x)
    routing = route(row_slot, slot_rank.shape[0]) if x.shape[0] > sort_min_rows() else None
    u = _shrink(x, pool_A, row_slot, sl, max_rank, routing, False, "multi.delta_shrink")
    _add_terms(y, u, pool_BT, row_slot, sl, routing, False, "multi.delta")


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
    caller's to prevent. Inference only (no autograd). Under ``torch.autocast``, when y is in
    the autocast dtype (the output of an autocast ``F.linear``), x and the pools are cast to it
    as that ``F.linear``'s operands were; a y in another dtype takes them as given."""
    _check_tensor("y", y)
    _check_tensor("x", x)
    if x.dim() < 1 or y.dim() != x.dim() or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y: expected the leading shape of x {tuple(x.shape[:-1])} and N columns, got "
                         f"y {tuple(y.shape)} for x {tuple(x.shape)}")
    if autocasting(x.device) and y.dtype == torch.get_autocast_dtype(x.device.type):
        # y from an F.linear under autocast: the adapters' operands as that F.linear saw its own
        x, pool_A, pool_BT = autocast_inputs(x, pool_A, pool_BT)
    _check_same("y", y, x)
    x2 = rows_of(x)
    M, N = x2.shape[0], y.shape[-1]
    try:
        y2 = y.view(M, N)   # not view(-1, N): ambiguous when N is 0
    except RuntimeError:
        raise ValueError(f"y: its rows must be addressable as one (rows, N) view to be added into in place; got "
                         f"strides {y.stride()} for shape {tuple(y.shape)}") from None
    if _overlaps_itself(y2):
        raise ValueError(f"y: elements of y share memory (strides {y.stride()} for shape {tuple(y.shape)}); "
                         "clone() it before adding into it in place")
    check_pools_and_tables(x2, N, row_slot, pool_A, pool_BT, slot_off, slot_rank, slot_scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, x, pool_A, pool_BT)):
        raise ValueError("add_multi_lora_ is inference only: y, x, pool_A and pool_BT must not require grad "
                         "(run it under torch.no_grad(), or train with fusedlora.multi.multi_lora_linear)")
    row_slot, slot_off, slot_rank, slot_scale = (t.contiguous() for t in (row_slot, slot_off, slot_rank, slot_scale))
    if validate:
        max_rank = _check_table_values(row_slot, slot_off, slot_rank, None, pool_A.shape[0], max_rank)
    elif max_rank is None or isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(f"max_rank: validate=False needs the largest slot rank as an int >= 0, got {max_rank!r}")
    else:  # u is max_rank wide: a larger slot rank would write past it (one tiny launch, no sync)
        slot_rank = slot_rank.clamp(max=max_rank)
    op = pick(_add_multi_lora, y2, x2, pool_A, pool_BT)
    if op is _add_multi_lora.direct and y.is_inference() and not torch.is_inference_mode_enabled():
        # (the custom op's dispatch refuses this itself; the direct call must say it too)
        raise RuntimeError("y: an inference tensor cannot be updated in place outside torch.inference_mode(), "
                           "as no in-place op can")
    op(y2, x2, pool_A, pool_BT, row_slot, slot_off, slot_rank, slot_scale, int(max_rank))
    if op is _add_multi_lora.direct:
        # the kernels wrote y through its pointer: tell autograd, as the custom op's dispatch does
        # (a graph that saved y must refuse to run backward on the changed values)
        torch.autograd.graph.increment_version(y)
    return y
