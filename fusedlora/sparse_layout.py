"""The sparse delta's nonzeros: their checks, the tile-bucketed layout the kernels read,
and the mask builders (PEFT's SHiRA masks).

Same math as PEFT's SHiRA tuner: ``indices`` (2, nnz) of integers, row i in
out_features N and column in in_features K of the value ``values[i]``; S is
their sparse matrix (N x K) and ``scaling`` multiplies it.

Tile-bucketed layout (``SparseLayout``, built once per adapter by
``build_layout``; a plain ``sparse_linear`` call without one builds it on the
fly). With a square layout tile T (a power of two, 8..128; default 64, 16
under the Triton interpreter) W splits into NUM_TN x NUM_TK tiles,
NUM_TN = ceil(N / T), NUM_TK = ceil(K / T); bucket b = tn * NUM_TK + tk holds
the nonzeros with row // T == tn and col // T == tk:

    offsets  int32 (NUM_TN * NUM_TK + 1,)  bucket b is positions offsets[b] .. offsets[b+1]-1
    rows     int32 (nnz,)  absolute row (in N) of each position, buckets in order,
    cols     int32 (nnz,)  absolute column (in K);  within a bucket sorted by (row, col)
    perm     int32 (nnz,)  position p holds the user's nonzero perm[p]:
                           rows[p] == indices[0, perm[p]], cols[p] == indices[1, perm[p]]

``values`` never gets reordered: the kernels read values[perm[p]] and write
the value gradient to d_values[perm[p]], so the parameter and its gradient
stay in the user's order. The layout depends only on the indices and W's
shape, never on the values: training the values or changing ``scaling``
reuses it. The forward GEMM reads the buckets of output tile tn in row tn of
the bucket grid and the dx GEMM those of output tile tk in column tk: one
layout serves both (see fusedlora.kernels.sparse for how the nonzeros merge
into the weight tile before tl.dot).

Mask builders: ``random_indices`` (PEFT's ``random_mask`` for the same seed)
and ``magnitude_indices`` (top-k of |W|), with nnz as a ``density`` (fraction
of N * K) or PEFT's ``r`` (nnz = r * (N + K)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backend import interpreting
from .ops import check_scalar

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_MIN_TILE, _MAX_TILE = 8, 128


def default_tile() -> int:
    """Layout tile: 64 matches the GPU kernels' tiles; the interpreter's tiles are 16."""
    return 16 if interpreting() else 64


# ----------------------------------------------------------------- layout
@dataclass(frozen=True, eq=False)
class SparseLayout:
    """Nonzeros of a sparse delta bucketed by TILE x TILE tiles of W (see the module docstring)."""

    shape: Tuple[int, int]
    tile: int
    offsets: Tensor
    rows: Tensor
    cols: Tensor
    perm: Tensor

    @property
    def nnz(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_tiles(self) -> Tuple[int, int]:
        return -(-self.shape[0] // self.tile), -(-self.shape[1] // self.tile)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.offsets, self.rows, self.cols, self.perm

    def to(self, device) -> "SparseLayout":
        return SparseLayout(self.shape, self.tile, *(t.to(device) for t in self.tensors()))

    def indices(self) -> Tensor:
        """The (2, nnz) int64 indices in the user's order."""
        return _user_indices(self.rows, self.cols, self.perm)


def _user_indices(rows: Tensor, cols: Tensor, perm: Tensor) -> Tensor:
    out = torch.empty((2, rows.shape[0]), dtype=torch.int64, device=rows.device)
    out[:, perm.long()] = torch.stack((rows.long(), cols.long()))
    return out


def _check_shape(shape) -> Tuple[int, int]:
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"shape: expected (out_features, in_features) of non-negative ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_indices(indices, shape, *, check_values: bool = True) -> Tuple[Tensor, Tensor]:
    """Checks ``indices`` for a weight of ``shape``; returns (rows, cols) as int64.

    ``check_values`` also checks the range and duplicates (a host sync)."""
    N, K = _check_shape(shape)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor of shape (2, nnz), got {type(indices).__name__}")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"indices: expected an integer dtype (int32 or int64), got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"indices: expected shape (2, nnz) (rows in out_features, columns in in_features), "
                         f"got {tuple(indices.shape)}")
    nnz = indices.shape[1]
    if nnz >= 2**31:
        raise ValueError(f"indices: at most 2^31 - 1 nonzeros are supported, got {nnz}")
    rows, cols = indices[0].long(), indices[1].long()
    if check_values and nnz and not indices.is_meta:  # meta indices hold no values to check
        bad = (rows < 0) | (rows >= N) | (cols < 0) | (cols >= K)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"indices: nonzero {i} at (row {int(rows[i])}, col {int(cols[i])}) is out of range "
                             f"for a weight of shape ({N}, {K})")
        key, _ = torch.sort(rows * K + cols)
        dup = key[1:] == key[:-1]
        if bool(dup.any()):
            k = int(key[1:][dup][0])
            raise ValueError(f"indices: duplicate nonzero at (row {k // K}, col {k % K}); "
                             "each (row, col) pair may appear once")
    return rows, cols


def build_layout(indices: Tensor, shape, tile: Optional[int] = None, device=None,
                 validate: bool = True) -> SparseLayout:
    """The tile-bucketed layout of ``indices`` for a weight of ``shape`` (N, K); once per adapter.

    ``device`` defaults to the indices' device. ``validate=False`` skips the
    range and duplicate checks (for indices that passed them already)."""
    N, K = _check_shape(shape)
    tile = default_tile() if tile is None else tile
    if isinstance(tile, bool) or not isinstance(tile, int) or tile & (tile - 1) or not _MIN_TILE <= tile <= _MAX_TILE:
        raise ValueError(f"tile: expected a power of two in [{_MIN_TILE}, {_MAX_TILE}], got {tile!r}")
    rows, cols = check_indices(indices, (N, K), check_values=validate)
    if not validate and rows.numel():
        # unchecked (a traced forward's build, where a sort and a host sync cannot run): clamped,
        # so that indices loaded out of range give wrong numbers there, never out-of-bounds
        # accesses in the kernels; the next eager use checks them and raises
        rows, cols = rows.clamp(0, N - 1), cols.clamp(0, K - 1)
    if device is not None:
        rows, cols = rows.to(device), cols.to(device)
    num_tn, num_tk = -(-N // tile), -(-K // tile)
    bucket = (rows // tile) * num_tk + cols // tile
    # (bucket, row, col) -> one int64 key: buckets in order, row-major inside.
    key = (bucket * tile + rows % tile) * tile + cols % tile
    key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_tn * num_tk + 1, device=rows.device, dtype=torch.int64) * (tile * tile)
    offsets = torch.searchsorted(key, bounds)
    return SparseLayout((N, K), tile, offsets.to(torch.int32), rows[order].to(torch.int32),
                        cols[order].to(torch.int32), order.to(torch.int32))


# ------------------------------------------------------------------ masks
def shira_num_nonzeros(shape, *, density: Optional[float] = None, r: Optional[int] = None) -> int:
    """nnz of a mask for W of ``shape`` (N, K): round(density * N * K), or PEFT's r * (N + K)."""
    N, K = _check_shape(shape)
    if (density is None) == (r is None):
        raise ValueError("density, r: give exactly one of them")
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        nnz = r * (N + K)
        if nnz > N * K:
            raise ValueError(f"r: r * (out_features + in_features) = {nnz} exceeds the {N * K} weights of "
                             f"a ({N}, {K}) layer")
        return nnz
    density = check_scalar("density", density, 0.0, 1.0)
    return int(round(density * N * K))


def _flat_to_indices(flat: Tensor, K: int) -> Tensor:
    flat, _ = torch.sort(flat)  # row-major order, as torch.where(mask) gives PEFT's indices
    return torch.stack((flat // K, flat % K))


def random_indices(shape, *, density: Optional[float] = None, r: Optional[int] = None,
                   seed: Optional[int] = None, device=None) -> Tensor:
    """(2, nnz) int64 indices of a uniformly random mask; for the same seed and nnz
    exactly the mask of PEFT's ``shira.mask_functions.random_mask``. ``seed=None`` is, as
    in PEFT, a fresh generator's default seed: the same mask every call, not a new one."""
    N, K = _check_shape(shape)
    nnz = shira_num_nonzeros((N, K), density=density, r=r)
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(int(seed))
    flat = torch.randperm(N * K, generator=gen)[:nnz]
    return _flat_to_indices(flat, K).to(device if device is not None else "cpu")


def magnitude_indices(weight: Tensor, *, density: Optional[float] = None, r: Optional[int] = None) -> Tensor:
    """(2, nnz) int64 indices of the nnz entries of largest |W| (on weight's device)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"weight: expected a 2-D torch.Tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    N, K = weight.shape
    nnz = shira_num_nonzeros((N, K), density=density, r=r)
    flat = torch.topk(weight.detach().abs().flatten().float(), nnz, sorted=False).indices
    return _flat_to_indices(flat, K)


def mask_to_indices(mask: Tensor) -> Tensor:
    """PEFT's conversion of a 0/1 mask of W's shape into (2, nnz) indices (row-major)."""
    return torch.stack(torch.where(mask != 0))
