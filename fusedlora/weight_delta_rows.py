"""The C3A and sparse rows of a routed batch, in one Triton launch.

In a batch routed by ``adapter_ids``, LoRA rows run in the multi-adapter kernels; a
row of a C3A or sparse adapter gets the base there (its slot has rank 0) and its
adapter's delta added after. Done per adapter with PyTorch ops, that is a handful of
launches for every such adapter in the layer and, without the host sync of validation
(``validate=False``, CUDA graphs), each adapter's delta computed for every row and
masked: O(adapters x rows). ``multi_weight_delta_rows_kernel`` adds every row's delta
in one launch whatever the mix: a program per (row, output tile); rows of LoRA
adapters and base rows return at once. The adapters are read where they are (the C3A
kernels and sparse values are the parameters themselves; the sparse nonzeros the
CSR rows of their layout, built once), through a per-slot table of addresses, so
nothing is copied per call and no host sync is needed: CUDA-graph capturable.

Served for inference (no gradient asked of x or of the C3A / sparse parameters),
eager calls (torch.compile traces the PyTorch form), batches of up to ``max_rows()``
rows (16: measured, see MAX_ROWS_GPU; each row gathers its adapter, C3A's circulant N x K
per row from cache, where more rows are better served by one FFT per adapter). Recorded as ``multi.c3a_delta:triton:rows`` and
``multi.sparse_delta:triton:rows``.

The table caches raw addresses: it is rebuilt when an adapter is added or deleted or a
parameter or index buffer is replaced, moved or changed in place (their identity,
address and version), in place when its shape allows, so that a captured CUDA graph
reads the current one. Like any captured graph, one captured before an adapter is
added, deleted or replaced reads the old tables and storage: capture again (docs/multi.md).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .backend import cdiv, interpreting, record, scoped_setting, select_backend
from .derived import outside_inference_mode, same_key, version
from .ops import on_device, triton_serves

_VALUE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ONE_LAUNCH = True  # off: the per-adapter PyTorch form serves (bench/kinds.py times both)


def use_one_launch(on: bool):
    """ONE_LAUNCH for the calls in this scope (process-wide, like backend.use_backend)."""
    return scoped_setting(__name__, "ONE_LAUNCH", bool(on))


def _fingerprint(layer, names: Sequence[str], kinds: Sequence[str], device: torch.device) -> tuple:
    """What the table depends on, read at C speed: each C3A kernel, sparse value and index
    tensor itself (held, so none of them can be freed and its id handed to a new one while
    the table is kept: compared by identity; the table also holds the indices' storage, which
    `.data = ` could free), its address, shape, strides and dtype, the indices' version, the
    scalings, the device and the layer's adds / deletes."""
    fp: list = [layer._multi_struct, device]
    for name, kind in zip(names, kinds):
        if kind == "c3a":
            k = layer.c3a_kernel[name]
            fp += (k, k.data_ptr(), k.shape, k.stride(), k.dtype, k.device)
        elif kind == "sparse":
            v, i = layer.sparse_values[name], layer.sparse_indices[name]
            # an inference tensor keeps no version: taken as unchanged, as the layouts' cache takes it
            fp += (v, v.data_ptr(), v.shape, v.stride(), v.dtype, v.device, i, i.data_ptr(), i.device,
                   version(i), layer.sparse_scaling[name])
    return tuple(fp)


def _entries(layer, names: Sequence[str], kinds: Sequence[str], device: torch.device):
    """(rows of the slot table, scales, tensors the addresses point into), or None when an
    adapter's tensors are not where and what the kernel reads (on ``device``; a float32 C3A
    kernel of shape (N/b, K/b, b); sparse values of the layout's length, one stride): the
    PyTorch form then serves (and raises where it must)."""
    from .sparse import _row_csr

    N, K = layer.out_features, layer.in_features
    rows: List[List[int]] = []
    scales: List[float] = []
    keep: List[Tensor] = []
    for name, kind in zip(names, kinds):
        if kind == "c3a":
            k = layer.c3a_kernel[name]
            if k.device != device or k.dtype != torch.float32 or k.dim() != 3 or k.shape[2] < 1 or \
                    k.shape[0] * k.shape[2] != N or k.shape[1] * k.shape[2] != K:
                return None
            rows.append([1, k.data_ptr(), k.shape[2], *k.stride()])
            scales.append(0.0)
        elif kind == "sparse":
            v = layer.sparse_values[name]
            if v.device != device or v.dtype not in _VALUE_CODES or v.dim() != 1 or not v.is_contiguous() or \
                    layer.sparse_indices[name].device != device:
                return None
            layout = layer._layout(name)
            if v.shape[0] != layout.nnz:
                return None
            row_ptr, col, order = _row_csr(layout.rows, layout.cols, layout.perm, N)
            # the indices' storage too: `indices.data = new` would free it, and a later swap
            # could bring other indices back at its address with its version (a stale CSR)
            keep += [row_ptr, col, order, layer.sparse_indices[name].detach()]
            rows.append([2, row_ptr.data_ptr(), col.data_ptr(), order.data_ptr(), v.data_ptr(), _VALUE_CODES[v.dtype]])
            scales.append(float(layer.sparse_scaling[name]))
        else:
            rows.append([0] * 6)
            scales.append(0.0)
    return rows, scales, keep


def _table(layer, names: Sequence[str], kinds: Sequence[str], device: torch.device):
    """(table int64 (S, 6), scale float32 (S,)) for the layer's slots, or None (see _entries)."""
    fp = _fingerprint(layer, names, kinds, device)
    cached = layer._delta_rows
    if cached is not None and same_key(cached[0], fp):
        return cached[1], cached[2]
    with outside_inference_mode():  # kept across calls, also by calls outside inference mode
        built = _entries(layer, names, kinds, device)
        if built is None:
            return None
        rows, scales, keep = built
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        scale = torch.tensor(scales, dtype=torch.float32).to(device)
        if cached is not None and cached[1].shape == table.shape and cached[1].device == device:
            cached[1].copy_(table)  # in place: a captured CUDA graph reads the new addresses
            cached[2].copy_(scale)
            table, scale = cached[1], cached[2]
    layer._delta_rows = (fp, table, scale, keep)
    return table, scale


# The most rows the one launch takes, from GPU measurements (bench/kinds.py; H200, bf16,
# 4096 x 4096, 8 adapters, CUDA-graph replays, bench/results/2026-11-28_h200): 16 rows 295 us
# against 316 us for the per-adapter form, 64 rows 826 us against 557 us (C3A's circulant,
# gathered per row, is N x K multiply-adds a row where the FFT form does N x K / b).
MAX_ROWS_GPU = 16


def max_rows() -> int:
    from .multi import sort_min_rows

    return min(MAX_ROWS_GPU, sort_min_rows())


def serves(layer, x2: Tensor, names: Sequence[str], kinds: Sequence[str]) -> bool:
    """Whether add_rows_ takes this call (see the module docstring); False sends the rows
    to the per-adapter PyTorch form."""

    M, K = x2.shape
    if not (ONE_LAUNCH and 0 < M <= max_rows() and K > 0 and layer.out_features > 0):
        return False
    if not triton_serves(x2.device, x2.dtype) or select_backend(x2.device, "multi.weight_delta", M) not in (
            "triton", "cuda"):
        return False
    if forward_ad._current_level >= 0:
        return False  # forward-mode AD: x may carry a tangent the kernel would not see
    if torch.is_grad_enabled():
        params = [layer.c3a_kernel[n] if k == "c3a" else layer.sparse_values[n]
                  for n, k in zip(names, kinds) if k != "lora"]
        if x2.requires_grad or any(p.requires_grad for p in params):
            return False
    return True


def add_rows_(layer, y: Tensor, x2: Tensor, row_slot: Tensor, names: Sequence[str], kinds: Sequence[str],
              kinds_in_batch: Sequence[str]) -> bool:
    """y[m] += the delta of row m's C3A or sparse adapter, for every row, in one launch
    (in place; y is the fresh output of the LoRA / base step). False when an adapter's
    tensors are not where and what the kernel reads (see _entries): nothing was done.
    ``kinds_in_batch``: the kinds recorded as served (those with rows, when validation
    counted them; else every C3A / sparse kind of the layer, whose rows may be there)."""
    from .kernels.multi import multi_weight_delta_rows_kernel

    got = _table(layer, names, kinds, x2.device)
    if got is None:
        return False
    table, scale = got
    (M, K), N = x2.shape, layer.out_features
    block_n, block_k = (32, 32) if interpreting() else (64, 64)
    with on_device(x2.device):  # Triton launches on the current device
        multi_weight_delta_rows_kernel[(cdiv(N, block_n), M)](
            y, x2, row_slot, table, scale, N, K, 1.0 / K, y.stride(0), y.stride(1), x2.stride(0), x2.stride(1),
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=16)
    for kind in sorted(set(kinds_in_batch) - {"lora"}):
        record(f"multi.{kind}_delta", "triton", "rows")
    return True

