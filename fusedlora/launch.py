"""Allocate and launch the Triton kernels: tile plans, autotuning, split-K.

Callers (fusedlora.ops) validate arguments first; this layer only maps a
matrix product onto ``lora_matmul_kernel`` and picks its tiles.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .backend import cdiv, interpreting, next_pow2, record, scoped_setting

import triton  # noqa: E402  (imported after backend so TRITON_INTERPRET is read)
import triton.language as tl  # noqa: E402

from .kernels.lora import lora_decode_finish_kernel, lora_decode_kernel, lora_matmul_kernel
from .kernels.tiles import dropout_materialize_kernel

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout of the adapter input x, drawn from (seed, row, col) of x.

    ``where`` says which operand of the product holds x: ``"a"`` (x is the
    left operand, rows x cols), ``"b"`` (x is the right operand) or ``"epi"``
    (the low-rank epilogue's output has the shape of x: dx).
    """

    p: float
    seed: int
    where: str


# Tile configurations for the compute-bound shapes, chosen for Hopper/Ampere;
# the autotuner keys them on (M bucket, N, K) so a serving loop with varying
# token counts does not re-tune for every M.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=5),
]
# Under the interpreter every program is numpy work on the CPU: small tiles
# keep tails and multi-tile grids covered at test shapes of a few dozen.
_INTERPRET_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


def _smem_footprint(config) -> int:
    """Shared memory a config's pipeline asks for, in operand elements (A and B tiles per stage)."""
    kw = config.kwargs
    m, n, k = (kw.get(name, 16) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (m * k + k * n) * max(config.num_stages, 1)


def autotuned(kernel, configs: list, key: list):
    """``kernel`` behind Triton's autotuner over ``configs``. FUSEDLORA_AUTOTUNE=0 keeps
    one config, the one with the smallest shared-memory footprint (the autotuner skips
    configs that do not fit, a single config cannot be skipped: the largest needed 311 KB
    for fp32 and C3A's exact delta on the H200): one compile per kernel variant instead of
    one per config, for a GPU test pass in a short lease."""
    if os.environ.get("FUSEDLORA_AUTOTUNE", "1").strip() == "0":
        configs = [min(configs, key=_smem_footprint)]
    return triton.autotune(configs=configs, key=key)(kernel)


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    configs = [triton.Config(dict(_INTERPRET_TILE))] if interpreting() else _GEMM_CONFIGS
    return autotuned(lora_matmul_kernel, configs, ["M_BUCKET", "N", "K", "R"])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The decode plan (M <= 16): its tile, its K depth by operand bytes, and how many programs
# split-K aims for per SM. Module constants so that bench/decode_plans.py can sweep them on
# a GPU; the H200 run measured this plan at 36-41% of the HBM roof at 4096 x 4096.
DECODE_TILE = {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
DECODE_BLOCK_K = {2: 128, 4: 32}
PROGRAMS_PER_SM = 2


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: enough splits to exercise the split-K path
    return PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, next_pow2(max(int(n), 1)))


def _input_precision(dot_dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting so results match F.linear's precision;
    # the flag is moot for 16-bit operands (left at Triton's default there).
    if dot_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def bias_arg(bias: Optional[torch.Tensor], absent: torch.Tensor) -> torch.Tensor:
    """The bias pointer of a launch: the kernels read bias with unit stride (a strided one
    is copied), and ``absent`` (any tensor, never read: HAS_BIAS=False) stands for none."""
    return bias.contiguous() if bias is not None else absent


def split_k(tiles: int, k_tiles: int, device: torch.device) -> int:
    """How many programs share the reduction so that ``tiles`` output tiles fill the GPU."""
    target = _target_programs(device)
    if tiles >= target or k_tiles < 1:  # K = 0: nothing to split
        return 1
    split = min(k_tiles, cdiv(target, tiles))
    return cdiv(k_tiles, cdiv(k_tiles, split))  # no split without a K tile


def _small_plan(M: int, N: int, K: int, device: torch.device, elem_bytes: int = 2) -> Optional[dict]:
    """Tile plan for memory-bound products (few rows, or a rank-r output), or
    None when the product fills the GPU and goes to the autotuned GEMM.
    ``elem_bytes`` of the operands: 4-byte tiles take a quarter of the K depth,
    so three pipeline stages fit an A100's shared memory (these plans bypass
    the autotuner, which would otherwise drop a config that does not fit)."""
    bk = 128 if elem_bytes <= 2 else 32
    if interpreting():
        tile = dict(_INTERPRET_TILE)
    elif M <= 16:  # decode: stream the weight once, split K to fill the SMs
        tile = {**DECODE_TILE, "BLOCK_K": DECODE_BLOCK_K[2 if elem_bytes <= 2 else 4]}
    elif N <= 128:  # rank-r output (shrink, dB): long reduction, narrow tile
        tile = {"BLOCK_M": 64, "BLOCK_N": _pow2_at_least(N), "BLOCK_K": bk, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 3}
    elif M <= 128:  # rank-r rows (dA): same, transposed
        tile = {"BLOCK_M": _pow2_at_least(M), "BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 3}
    else:
        return None
    return finish_plan(tile, M, N, K, device)


def finish_plan(plan: dict, M: int, N: int, K: int, device: torch.device) -> Optional[dict]:
    """Give a memory-bound tile plan its SPLIT_K; under the interpreter, hand
    shapes with enough tiles to the autotuned entry instead (None) so tests
    cover that path too."""
    tiles = cdiv(M, plan["BLOCK_M"]) * cdiv(N, plan["BLOCK_N"])
    plan["SPLIT_K"] = split_k(tiles, cdiv(K, plan["BLOCK_K"]), device)
    if interpreting() and M > 16 and tiles >= _target_programs(device):
        return None
    return plan


def gemm_output(M: int, N: int, plan: Optional[dict], out_dtype: torch.dtype, device) -> torch.Tensor:
    """C for one launch: a zeroed fp32 buffer when the reduction is split
    (programs add their partials into it atomically), else uninitialised."""
    if plan is not None and plan["SPLIT_K"] > 1:
        return torch.zeros((M, N), device=device, dtype=torch.float32)
    return torch.empty((M, N), device=device, dtype=out_dtype)


def launch_gemm(kernel, tuned, plan: Optional[dict], M: int, N: int, args: tuple, flags: dict, tag: str) -> None:
    """Launch a GEMM-shaped kernel over (M, N) output tiles: the autotuned entry
    (``tuned()``) when ``plan`` is None, else ``kernel`` with the plan's tiles and
    SPLIT_K programs per tile; record which ran."""
    if plan is None:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
        tuned()[grid](*args, **flags, SPLIT_K=1)
        record(tag, "triton", "gemm")
        return
    split = plan["SPLIT_K"]
    kernel[(cdiv(M, plan["BLOCK_M"]) * cdiv(N, plan["BLOCK_N"]), split)](*args, **flags, **plan)
    record(tag, "triton", "splitk" if split > 1 else "small")


def lowrank_block_r(R: int) -> int:
    """Ranks per epilogue dot: at most 64 on a GPU (larger or stacked ranks loop, so the tiles
    stay inside shared memory), 16 under the interpreter (so the tests' ranks loop too)."""
    return min(_pow2_at_least(R), 16 if interpreting() else 64)


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, dot_dtype: torch.dtype,
           alpha: float = 1.0, bias: Optional[torch.Tensor] = None,
           u: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
           dropout: Optional[Dropout] = None, tag: str = "matmul") -> torch.Tensor:
    """C = alpha * a @ b + bias + u @ v, each operand any 2-D strides."""
    M, K = a.shape
    N = b.shape[1]
    R = u.shape[1] if u is not None else 0
    if M == 0 or N == 0 or K == 0:
        # Empty reduction (e.g. a weight gradient over zero rows): nothing to launch.
        c = torch.zeros((M, N), device=a.device, dtype=torch.float32)
        if u is not None:
            c += u.float() @ v.float()
        if bias is not None:
            c += bias.float()
        return c.to(out_dtype)

    plan = _small_plan(M, N, K, a.device, dot_dtype.itemsize)
    c = gemm_output(M, N, plan, out_dtype, a.device)
    p = dropout.p if dropout is not None else 0.0
    drop_at = dropout.where if (dropout is not None and p > 0.0) else None
    args = (
        a, b, c, bias_arg(bias, c), u if u is not None else c, v if v is not None else c,
        M, N, K, R, _pow2_at_least(M, 1),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        u.stride(0) if u is not None else 0, u.stride(1) if u is not None else 0,
        v.stride(0) if v is not None else 0, v.stride(1) if v is not None else 0,
        float(alpha), float(p), 1.0 / (1.0 - p), int(dropout.seed) if drop_at else 0,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_LOWRANK=u is not None,
        DROP_A=drop_at == "a", DROP_B=drop_at == "b", DROP_EPI=drop_at == "epi",
        DOT_DTYPE=_tl_dtype(dot_dtype), INPUT_PRECISION=_input_precision(dot_dtype),
        BLOCK_R=lowrank_block_r(R),
    )
    launch_gemm(lora_matmul_kernel, _tuned_kernel, plan, M, N, args, flags, tag)
    return c if c.dtype == out_dtype else c.to(out_dtype)


# The two-launch decode pairs (lora_decode below, multi._decode_pair, sparse._rows_decode,
# c3a._decode_pair) serve 1..16 rows without dropout; False runs the earlier forms there
# instead (the split-K plan's four or five GPU operations, C3A's fused GEMM). The decode
# bench times both (bench/decode.py, column triton-splitk) until a GPU run settles it.
DECODE_PAIR = True


def use_decode_pair(on: bool):
    """DECODE_PAIR for the calls in this scope (process-wide, like backend.use_backend)."""
    return scoped_setting(__name__, "DECODE_PAIR", bool(on))


def decode_pair_serves(x: torch.Tensor, weight: torch.Tensor, dropout: bool) -> bool:
    return DECODE_PAIR and 0 < x.shape[0] <= 16 and not dropout and weight.shape[0] > 0 and x.shape[1] > 0


def decode_plan(x: torch.Tensor, N: int) -> dict:
    """The first launch's tiles for a decode pair over x (M x K) and N output features: the
    decode plan, SPLIT_K cut for W's column tiles alone (as the split-K plan would; the
    shrink's or delta's programs beside them are light)."""
    M, K = x.shape
    plan = dict(_small_plan(M, N, K, x.device, x.dtype.itemsize))
    plan.pop("GROUP_M")
    assert 0 < M <= plan["BLOCK_M"] and N > 0 and K > 0, (M, N, K)
    plan["SPLIT_K"] = split_k(cdiv(N, plan["BLOCK_N"]), cdiv(K, plan["BLOCK_K"]), x.device)
    return plan


def decode_partials(x: torch.Tensor, weight: torch.Tensor, lora_A: Optional[torch.Tensor] = None):
    """The first launch of a decode pair (lora_decode_kernel): fp32 partials, one slice per K
    split, of x [A; W]^T (x W^T alone without lora_A), A's columns padded to whole tiles.
    Returns (part, plan, r_cols): y's partials are part[:, :, r_cols:]."""
    M, K = x.shape
    N, R = weight.shape[0], (lora_A.shape[0] if lora_A is not None else 0)
    plan = decode_plan(x, N)
    bn, split = plan["BLOCK_N"], plan["SPLIT_K"]
    r_tiles, n_tiles = cdiv(R, bn), cdiv(N, bn)
    part = torch.empty((split, M, r_tiles * bn + N), device=x.device, dtype=torch.float32)
    a = lora_A if lora_A is not None else weight  # no shrink tiles: never read
    lora_decode_kernel[((r_tiles + n_tiles) * split,)](
        x, weight, a, part, M, N, K, R, r_tiles,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), a.stride(0), a.stride(1),
        part.stride(0), part.stride(1), DOT_DTYPE=_tl_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        **plan)
    return part, plan, r_tiles * bn


def lora_decode(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float):
    """(y, u) of a LoRA forward of 1..16 rows without dropout in two launches and no memset
    (kernels/lora.py, decode): the shrink's column tiles run in the base GEMM's grid, and
    the splits' partials are summed by a finishing kernel in a fixed order."""
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    part, plan, r_cols = decode_partials(x, weight, lora_A)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, R), device=x.device, dtype=torch.float32)
    block_r = lowrank_block_r(R)
    bn = plan["BLOCK_N"]
    warps = {k: plan[k] for k in ("num_warps",) if k in plan}
    lora_decode_finish_kernel[(cdiv(N, bn),)](
        part, lora_B, bias_arg(bias, y), u, y, M, N, R, r_cols,
        part.stride(0), part.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), float(scaling),
        HAS_BIAS=bias is not None, DOT_DTYPE=_tl_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        SPLIT_K=plan["SPLIT_K"], BLOCK_M=plan["BLOCK_M"], BLOCK_N=bn, BLOCK_R=block_r, **warps)
    record("lora.forward", "triton", "decode")
    return y, u


def dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """The keep-mask (float32 of 0/1) that the kernels draw for an x of ``shape``."""
    M, N = shape
    out = torch.empty((M, N), device=device, dtype=torch.float32)
    if M and N:
        from .ops import on_device

        grid = (cdiv(M, 32), cdiv(N, 32))
        with on_device(out.device):  # called outside any fused op's body (ops.dropout_keep_mask)
            dropout_materialize_kernel[grid](out, M, N, out.stride(0), out.stride(1), float(p), int(seed),
                                             BLOCK_M=32, BLOCK_N=32)
    return out


