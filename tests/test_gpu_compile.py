"""Compile the Triton kernels ahead of time for real GPU targets (sm_80, sm_90).

The interpreter runs the kernels' math but never compiles them; this runs the
whole Triton -> PTX -> cubin pipeline (ptxas ships with triton) on the CPU, so
a kernel that would not build on an A100/H100, or that lost its tensor-core
instructions, fails here without a GPU. The compiler must run in a process
without TRITON_INTERPRET (which replaces @triton.jit functions at import), so
the test runs this file as a script.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest

_FLOAT_SCALARS = ("alpha", "p", "keep_scale", "w_scale", "scaling")
_INT_POINTERS = ("off_ptr", "offsets_ptr", "red_idx_ptr", "out_idx_ptr", "perm_ptr", "rows_ptr", "cols_ptr", "row_ptr", "col_ptr",
                 "slot_ptr", "sorted_ptr", "ends_ptr", "rank_ptr", "start_ptr", "end_ptr")
_FP32_POINTERS = ("u_ptr", "w_ptr", "val_ptr", "scale_ptr", "l_ptr", "drop_ptr", "y_ptr", "part_ptr")


# Unit strides of row-major operands in the forward orientation (b = W^T); Triton's
# JIT specialises an int argument equal to 1 as a constant, and one divisible by 16
# as such, at every real launch: the ahead-of-time compile does the same so that
# vector widths, software pipelining and shared memory match what runs.
FORWARD_UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_cn", "stride_ur", "stride_vn", "stride_xk", "stride_pk",
                        "stride_qn", "stride_on", "stride_w_u", "stride_af", "stride_xf", "stride_out_k", "stride_w_k",
                        "stride_weight_k", "stride_lora_a_k", "stride_lora_b_r", "stride_pool_a_k")


def compile_variant(kernel, arch, dtype, out, consts, num_warps, num_stages, unit=FORWARD_UNIT_STRIDES):
    """Compile ``kernel`` for sm_<arch>: data pointers of ``dtype`` ('bf16', ...),
    c_ptr/out_ptr of ``out``, fp32 adapter weights, int32 layouts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    consts = {**{n: 1 for n in unit if n in params and n not in consts}, **consts}
    sig, aligned = {}, []
    for i, name in enumerate(params):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in ("c_ptr", "out_ptr"):
            sig[name] = f"*{out}"
        elif name in _INT_POINTERS:
            sig[name] = "*i32"
        elif name in ("order_ptr", "table_ptr"):  # int64 positions (torch.sort's indices), addresses
            sig[name] = "*i64"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name == "seed" else "i32"
        if sig[name].startswith("*") or (sig[name] == "i32" and name != "M"):
            aligned.append((i,))
    src = ASTSource(kernel, sig, constexprs=consts, attrs={key: [["tt.divisibility", 16]] for key in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def gemm(**kw):
    import triton.language as tl

    base = dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_K=1, BLOCK_M=128, BLOCK_N=128,
                BLOCK_K=64, GROUP_M=8)
    base.update(kw)
    return base


def lora(**kw):
    return gemm(**{**dict(HAS_BIAS=False, HAS_LOWRANK=False, DROP_A=False, DROP_B=False, DROP_EPI=False,
                          BLOCK_R=16), **kw})


def tile_plan(M, N, K, elem_bytes, plan_of=None):
    """(tile constexprs, warps, stages) of the plan fusedlora picks on a GPU for this
    product (``plan_of``: launch._small_plan unless a path sizes its own)."""
    import torch

    from fusedlora.launch import _small_plan

    plan = dict((plan_of or _small_plan)(M, N, K, torch.device("cpu"), elem_bytes))
    return plan, plan.pop("num_warps"), plan.pop("num_stages")


def planned(M, N, K, elem_bytes, **consts):
    """The LoRA kernel under that plan (split-K and memory-bound shapes bypass the
    autotuner, so nothing else checks them)."""
    plan, warps, stages = tile_plan(M, N, K, elem_bytes)
    return lora(**{**plan, **consts}), warps, stages


# Every kernel that launches with a launch._small_plan tile (memory-bound shapes bypass the
# autotuner, which would drop a config that does not fit), at each of the plan's regimes,
# for 2- and 4-byte operands on sm_80 (the smallest shared memory, 163 KB): the H200 found
# a C3A plan of 311 KB that no test had compiled.
PLAN_REGIMES = {"decode": (8, 4096, 4096), "narrow-n": (1000, 96, 160), "narrow-m": (96, 1000, 160)}
PLAN_KERNELS = ("lora", "multi-sgmv", "multi-bgmv", "c3a-forward", "c3a-grad-x", "c3a-grad-kernel")
PLAN_NAMES = [f"plan-{k}-sm80-{dt}-{r}" for k in PLAN_KERNELS for dt in ("fp16", "fp32") for r in PLAN_REGIMES]


def plan_variants():
    import triton.language as tl

    from fusedlora.c3a import matmul_plan as c3a_matmul_plan
    from fusedlora.kernels.c3a import c3a_kernel_grad_kernel, c3a_matmul_kernel
    from fusedlora.kernels.lora import lora_matmul_kernel
    from fusedlora.kernels.multi import multi_matmul_kernel

    out = {}
    for dt, eb in (("fp16", 2), ("fp32", 4)):
        dot = dict(DOT_DTYPE=tl.float16) if eb == 2 else dict(DOT_DTYPE=tl.float32, INPUT_PRECISION="ieee")
        for regime, (M, N, K) in PLAN_REGIMES.items():
            for k in PLAN_KERNELS:
                plan, warps, stages = tile_plan(M, N, K, eb, c3a_matmul_plan if k in ("c3a-forward", "c3a-grad-x")
                                                else None)  # as launched
                if k == "lora":
                    kernel, consts = lora_matmul_kernel, lora(**plan, **dot, HAS_BIAS=True, HAS_LOWRANK=True)
                elif k.startswith("multi"):
                    kernel, consts = multi_matmul_kernel, gemm(**plan, **dot, HAS_BIAS=True, DROP_EPI=False,
                                                               SORTED=k.endswith("sgmv"), SEG_DOT_MAX=0, BLOCK_R=16)
                elif k == "c3a-grad-kernel":
                    kernel, consts = c3a_kernel_grad_kernel, gemm(**plan, **dot)
                else:
                    kernel, consts = c3a_matmul_kernel, gemm(**plan, **dot, HAS_BIAS=k.endswith("forward"),
                                                             REDUCE_IN=k.endswith("forward"), EXACT_DELTA=eb == 2)
                c_dt = "fp32" if plan["SPLIT_K"] > 1 or k == "c3a-grad-kernel" else dt
                out[f"plan-{k}-sm80-{dt}-{regime}"] = (kernel, 80, dt, c_dt, consts, warps, stages, None)
    return out


def variants():
    """name: (kernel, arch, operand dtype, output dtype, constexprs, warps, stages, tensor-core op)."""
    import triton.language as tl

    from fusedlora.kernels.c3a import (c3a_circulant_kernel, c3a_decode_finish_kernel, c3a_decode_kernel,
                                       c3a_diagonal_sums_kernel, c3a_kernel_grad_kernel, c3a_matmul_kernel)
    from fusedlora.kernels.lora import lora_decode_finish_kernel, lora_decode_kernel, lora_matmul_kernel
    from fusedlora.kernels.multi import (multi_decode_finish_kernel, multi_decode_kernel, multi_grad_kernel,
                                         multi_matmul_kernel, multi_shrink_kernel, multi_weight_delta_rows_kernel)
    from fusedlora.kernels.sparse import (sddmm_kernel, sparse_decode_finish_kernel, sparse_densify_kernel,
                                          sparse_gather_kernel, sparse_matmul_kernel, sparse_rows_add_kernel)

    f16, f32 = dict(DOT_DTYPE=tl.float16), dict(DOT_DTYPE=tl.float32, INPUT_PRECISION="ieee")
    decode = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1)
    f32_dA, w_dA, s_dA = planned(128, 4096, 4096, 4, **f32, DROP_B=True)
    f32_shrink, w_sh, s_sh = planned(4096, 128, 4096, 4, DOT_DTYPE=tl.float32)
    return {
        # LoRA forward GEMM with bias and the rank-r epilogue, the largest autotune tile
        "lora-sm90-bf16-forward": (lora_matmul_kernel, 90, "bf16", "bf16",
                                   lora(HAS_BIAS=True, HAS_LOWRANK=True, BLOCK_N=256), 8, 3, "wgmma"),
        "lora-sm90-bf16-grad-x": (lora_matmul_kernel, 90, "bf16", "bf16", lora(HAS_LOWRANK=True, DROP_EPI=True),
                                  8, 4, "wgmma"),
        # decode: split-K, fp32 atomics, rank-64 epilogue; 16-row tiles are below wgmma's 64
        "lora-sm90-bf16-decode": (lora_matmul_kernel, 90, "bf16", "fp32",
                                  lora(HAS_BIAS=True, HAS_LOWRANK=True, SPLIT_K=5, BLOCK_R=64, **decode),
                                  4, 3, "mma"),
        # decode pair (two launches, no memset): shrink and W column tiles in one split-K grid
        # storing fp32 partials, then the finishing sum + rank-r expand + bias
        "lora-sm90-bf16-decode-pair": (lora_decode_kernel, 90, "bf16", "fp32",
                                       dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_K=4, BLOCK_M=16,
                                            BLOCK_N=64, BLOCK_K=128), 4, 3, "mma"),
        "lora-sm80-fp32-decode-pair": (lora_decode_kernel, 80, "fp32", "fp32",
                                       dict(**f32, SPLIT_K=3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32), 4, 3, None),
        "lora-sm90-bf16-decode-finish": (lora_decode_finish_kernel, 90, "bf16", "bf16",
                                         dict(HAS_BIAS=True, DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_K=4,
                                              BLOCK_M=16, BLOCK_N=64, BLOCK_R=64), 4, 3, "mma"),
        "lora-sm80-fp16-decode-finish": (lora_decode_finish_kernel, 80, "fp16", "fp16",
                                         dict(HAS_BIAS=False, DOT_DTYPE=tl.float16, INPUT_PRECISION="tf32", SPLIT_K=1,
                                              BLOCK_M=16, BLOCK_N=64, BLOCK_R=16), 4, 3, "mma.sync"),
        "lora-sm80-fp32-decode-finish": (lora_decode_finish_kernel, 80, "fp32", "fp32",
                                         dict(HAS_BIAS=True, **f32, SPLIT_K=3, BLOCK_M=16, BLOCK_N=64, BLOCK_R=32),
                                         4, 3, None),
        # ranks of 128 and 256: the launcher narrows the finish to 32 columns (64 spilled in fp32)
        # any rank: 64 ranks per step (launch.lowrank_block_r), the plan's 64 columns, no spill
        "lora-sm90-fp32-decode-finish-r64": (lora_decode_finish_kernel, 90, "fp32", "fp32",
                                             dict(HAS_BIAS=True, **f32, SPLIT_K=3, BLOCK_M=16, BLOCK_N=64,
                                                  BLOCK_R=64), 4, 3, None),
        # the rank-r rows plan (16 < M <= 128) in fp32 with a large (stacked) rank: 64 ranks per
        # epilogue dot keep it inside an A100's shared memory (a single 256-rank dot took 192 KB)
        "lora-sm80-fp32-forward-rank-rows": (lora_matmul_kernel, 80, "fp32", "fp32",
                                             lora(**f32, HAS_BIAS=True, HAS_LOWRANK=True, BLOCK_M=128, BLOCK_N=64,
                                                  BLOCK_K=32, BLOCK_R=64, GROUP_M=1), 4, 3, None),
        "lora-sm90-fp16-shrink": (lora_matmul_kernel, 90, "fp16", "fp32",
                                  lora(**f16, DROP_A=True, SPLIT_K=4, BLOCK_M=64, BLOCK_N=16, BLOCK_K=128,
                                       GROUP_M=1), 4, 3, "mma"),
        "lora-sm80-fp16-forward": (lora_matmul_kernel, 80, "fp16", "fp16",
                                   lora(**f16, HAS_BIAS=True, HAS_LOWRANK=True), 8, 4, "mma.sync"),
        # fp32 without tf32: exact FMA path, no tensor cores
        "lora-sm80-fp32-ieee-grad-A": (lora_matmul_kernel, 80, "fp32", "fp32",
                                       lora(**f32, DROP_B=True, SPLIT_K=3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32,
                                            GROUP_M=1), 4, 3, None),
        # fp32 plans as launch.py picks them (exact and tf32): must fit an A100's shared memory
        "lora-sm80-fp32-plan-grad-A": (lora_matmul_kernel, 80, "fp32", "fp32", f32_dA, w_dA, s_dA, None),
        "lora-sm80-tf32-plan-shrink": (lora_matmul_kernel, 80, "fp32", "fp32", f32_shrink, w_sh, s_sh, "mma.sync"),
        "c3a-sm90-bf16-forward": (c3a_matmul_kernel, 90, "bf16", "bf16",
                                  gemm(HAS_BIAS=True, REDUCE_IN=True, EXACT_DELTA=True), 8, 3, "wgmma"),
        "c3a-sm90-bf16-grad-x": (c3a_matmul_kernel, 90, "bf16", "bf16",
                                 gemm(HAS_BIAS=False, REDUCE_IN=False, EXACT_DELTA=True), 8, 3, "wgmma"),
        "c3a-sm90-bf16-decode": (c3a_matmul_kernel, 90, "bf16", "fp32",
                                 gemm(HAS_BIAS=True, REDUCE_IN=True, EXACT_DELTA=True, SPLIT_K=4, **decode), 4, 3, "mma"),
        # decode pair: the delta's fp32 (tf32) products beside W's split-K tiles, then the sum
        "c3a-sm90-bf16-decode-pair": (c3a_decode_kernel, 90, "bf16", "fp32",
                                      dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", DELTA_PRECISION="tf32x3",
                                           SPLIT_K=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_B=32,
                                           DELTA_BLOCK_K=64), 4, 3, "mma"),
        "c3a-sm90-bf16-decode-pair-b16": (c3a_decode_kernel, 90, "bf16", "fp32",
                                          dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", DELTA_PRECISION="tf32x3",
                                               SPLIT_K=5, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_B=16,
                                               DELTA_BLOCK_K=64), 4, 3, "mma"),
        "c3a-sm80-fp32-decode-pair": (c3a_decode_kernel, 80, "fp32", "fp32",
                                      dict(**f32, DELTA_PRECISION="ieee", SPLIT_K=2, BLOCK_M=16, BLOCK_N=64,
                                           BLOCK_K=32, BLOCK_B=16, DELTA_BLOCK_K=64), 4, 3, None),
        "c3a-sm90-bf16-decode-finish": (c3a_decode_finish_kernel, 90, "bf16", "bf16",
                                        dict(HAS_BIAS=True, SPLIT_K=4, BLOCK_M=16, BLOCK_N=64), 4, 3, None),
        "c3a-sm90-bf16-grad-kernel": (c3a_kernel_grad_kernel, 90, "bf16", "fp32", gemm(BLOCK_M=64, BLOCK_N=64),
                                      4, 3, "mma"),
        "sparse-sm90-bf16-forward": (sparse_matmul_kernel, 90, "bf16", "bf16",
                                     gemm(HAS_BIAS=True, HAS_DELTA=True, TILE=64, BLOCK_E=32), 8, 3, "wgmma"),
        "sparse-sm90-bf16-decode": (sparse_matmul_kernel, 90, "bf16", "fp32",
                                    gemm(HAS_BIAS=True, HAS_DELTA=True, TILE=64, BLOCK_E=32, SPLIT_K=4,
                                         **{**decode, "BLOCK_K": 64}), 4, 4, "mma"),
        # decode: the nonzeros of 32 output features by CSR row, 16 rows of x, into fp32 y
        "sparse-sm90-bf16-rows-add": (sparse_rows_add_kernel, 90, "bf16", "fp32",
                                      dict(BLOCK_M=16, BLOCK_N=32, BLOCK_E=16), 4, 1, None),
        "sparse-sm90-bf16-decode-finish": (sparse_decode_finish_kernel, 90, "bf16", "bf16",
                                           dict(HAS_BIAS=True, SPLIT_K=4, BLOCK_M=16, BLOCK_N=32, BLOCK_E=16), 4, 3,
                                           None),
        "sparse-sm80-fp16-rows-add-1row": (sparse_rows_add_kernel, 80, "fp16", "fp32",
                                           dict(BLOCK_M=1, BLOCK_N=32, BLOCK_E=16), 4, 1, None),
        # the cuBLAS compositions' helpers: W + s S in one pass, C3A's circulant and
        # the kernel gradient's diagonal sums of dY^T X
        "sparse-sm90-bf16-densify": (sparse_densify_kernel, 90, "bf16", "bf16", dict(TILE=64, BLOCK_K=256, BLOCK_E=64),
                                     4, 1, None),
        "sparse-sm90-bf16-gather": (sparse_gather_kernel, 90, "bf16", "fp32", dict(BLOCK_E=1024), 4, 1, None),
        "c3a-sm90-bf16-circulant": (c3a_circulant_kernel, 90, "bf16", "bf16", dict(BLOCK_N=32, BLOCK_K=128),
                                    4, 1, None),
        "c3a-sm90-bf16-diagonal-sums": (c3a_diagonal_sums_kernel, 90, "bf16", "fp32",
                                        dict(BLOCK_S=32, BLOCK_U=128), 4, 1, None),
        "sparse-sm90-bf16-sddmm": (sddmm_kernel, 90, "bf16", "fp32", dict(SPLIT_M=4, BLOCK_M=64, BLOCK_E=32),
                                   4, 2, None),
        # multi-adapter: SGMV base GEMM with per-segment rank-r dots in the epilogue (prefill)
        "multi-sm90-bf16-forward-sgmv": (multi_matmul_kernel, 90, "bf16", "bf16",
                                         gemm(HAS_BIAS=True, DROP_EPI=False, SORTED=True, SEG_DOT_MAX=0, BLOCK_R=16,
                                              BLOCK_N=256),
                                         8, 3, "wgmma"),
        # BGMV decode: split-K base GEMM, per-row gathered rank-1 epilogue (no dot there)
        "multi-sm90-bf16-decode-bgmv": (multi_matmul_kernel, 90, "bf16", "fp32",
                                        gemm(HAS_BIAS=True, DROP_EPI=False, SORTED=False, SEG_DOT_MAX=8, BLOCK_R=16,
                                             SPLIT_K=4, **decode), 4, 3, "mma"),
        # delta-only expand into y (fusedlora.add_multi_lora_): an empty K loop, the epilogue reads y's tile
        "multi-sm90-bf16-delta-sgmv": (multi_matmul_kernel, 90, "bf16", "bf16",
                                       gemm(HAS_BIAS=False, DROP_EPI=False, SORTED=True, SEG_DOT_MAX=0, BLOCK_R=16,
                                            BLOCK_M=64, BLOCK_K=16, ADD_C=True), 4, 3, "mma"),
        "multi-sm90-bf16-delta-bgmv": (multi_matmul_kernel, 90, "bf16", "bf16",
                                       gemm(HAS_BIAS=False, DROP_EPI=False, SORTED=False, SEG_DOT_MAX=0, BLOCK_R=16,
                                            BLOCK_M=16, BLOCK_K=16, ADD_C=True), 4, 3, None),
        # above 16 rows: dx = dy W from cuBLAS, each row's dropped g P_A added into it
        "multi-sm90-bf16-grad-x-add-sgmv": (multi_matmul_kernel, 90, "bf16", "bf16",
                                            gemm(HAS_BIAS=False, DROP_EPI=True, SORTED=True, SEG_DOT_MAX=0,
                                                 BLOCK_R=16, BLOCK_M=64, BLOCK_K=16, ADD_C=True), 4, 3, "mma"),
        # BGMV decode pair: per-row shrink programs and W's split-K tiles in one grid, then the
        # finishing sum with the per-row expand gathered in 3-D rank chunks
        "multi-sm90-bf16-decode-pair": (multi_decode_kernel, 90, "bf16", "fp32",
                                        dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_K=4, BLOCK_M=16,
                                             BLOCK_N=64, BLOCK_K=128, BLOCK_R=16, SHRINK_BLOCK_K=256), 4, 3, "mma"),
        "multi-sm90-bf16-decode-finish": (multi_decode_finish_kernel, 90, "bf16", "bf16",
                                          dict(HAS_BIAS=True, SPLIT_K=4, BLOCK_M=16, BLOCK_N=32, BLOCK_R=8), 4, 3,
                                          None),
        "multi-sm80-fp32-decode-pair": (multi_decode_kernel, 80, "fp32", "fp32",
                                        dict(**f32, SPLIT_K=2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, BLOCK_R=16,
                                             SHRINK_BLOCK_K=256), 4, 3, None),
        # dx with per-adapter dropout on the low-rank term, sm_80
        "multi-sm80-fp16-grad-x-sgmv": (multi_matmul_kernel, 80, "fp16", "fp16",
                                        gemm(**f16, HAS_BIAS=False, DROP_EPI=True, SORTED=True, SEG_DOT_MAX=0,
                                             BLOCK_R=16), 8, 4, "mma.sync"),
        "multi-sm90-bf16-shrink-sgmv": (multi_shrink_kernel, 90, "bf16", "fp32",
                                        dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SORTED=True, DROPOUT=True,
                                             SEG_DOT_MAX=8, SPLIT_K=2, BLOCK_M=64, BLOCK_R=64, BLOCK_K=64),
                                        4, 1, "mma"),
        "multi-sm90-bf16-shrink-bgmv": (multi_shrink_kernel, 90, "bf16", "fp32",
                                        dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SORTED=False, DROPOUT=False,
                                             SEG_DOT_MAX=8, SPLIT_K=4, BLOCK_M=1, BLOCK_R=16, BLOCK_K=256),
                                        4, 1, None),
        # C3A and sparse rows of a routed batch: addresses from a table, one program per (tile, row)
        "multi-sm90-bf16-weight-delta-rows": (multi_weight_delta_rows_kernel, 90, "bf16", "bf16",
                                              dict(BLOCK_N=64, BLOCK_K=64, BLOCK_E=16), 4, 1, None),
        "multi-sm80-fp16-weight-delta-rows": (multi_weight_delta_rows_kernel, 80, "fp16", "fp16",
                                              dict(BLOCK_N=64, BLOCK_K=64, BLOCK_E=16), 4, 1, None),
        "multi-sm90-bf16-grad-grouped": (multi_grad_kernel, 90, "bf16", "fp32",
                                         dict(DROP_R=True, DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_M=4,
                                              BLOCK_M=64, BLOCK_N=128, BLOCK_R=16), 4, 3, "mma"),
    }


def spill_bytes(ptx: str, arch: int) -> int:
    """Spill stores ptxas reports for the kernel (Triton ships ptxas)."""
    import re
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", run.stderr))


# The decode pairs are latency-bound launches of a few microseconds: no register spills.
NO_SPILLS = ("decode-pair", "decode-finish", "delta-")  # delta-: add_multi_lora_'s and the weight-delta rows


def main() -> None:
    report = {}
    for name, (kernel, arch, dtype, out, consts, warps, stages, mma) in {**variants(), **plan_variants()}.items():
        kernel = compile_variant(kernel, arch, dtype, out, consts, warps, stages)
        ptx = kernel.asm["ptx"]
        ttgir = kernel.asm["ttgir"]
        report[name] = {"arch": arch, "cubin_bytes": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared,
                        "expected_mma": mma, "has_mma": mma is None or mma in ptx,
                        "pipelined": "async_copy_global_to_local" in ttgir or "async_tma" in ttgir,
                        "spill_bytes": spill_bytes(ptx, arch) if any(t in name for t in NO_SPILLS) else None}
    print(json.dumps(report))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


NAMES = ["lora-sm90-bf16-decode-pair", "lora-sm80-fp32-decode-pair", "lora-sm90-bf16-decode-finish",
         "lora-sm80-fp16-decode-finish", "lora-sm80-fp32-decode-finish", "multi-sm80-fp32-decode-pair",
         "lora-sm80-fp32-plan-grad-A", "lora-sm80-tf32-plan-shrink", "lora-sm90-bf16-forward", "lora-sm90-bf16-grad-x", "lora-sm90-bf16-decode", "lora-sm90-fp16-shrink",
         "lora-sm80-fp16-forward", "lora-sm80-fp32-ieee-grad-A", "c3a-sm90-bf16-forward", "c3a-sm90-bf16-grad-x",
         "c3a-sm90-bf16-decode", "c3a-sm90-bf16-decode-pair", "c3a-sm90-bf16-decode-pair-b16",
         "lora-sm90-fp32-decode-finish-r64", "lora-sm80-fp32-forward-rank-rows", "c3a-sm80-fp32-decode-pair", "c3a-sm90-bf16-decode-finish", "c3a-sm90-bf16-grad-kernel", "sparse-sm90-bf16-forward",
         "sparse-sm90-bf16-decode", "sparse-sm90-bf16-sddmm", "sparse-sm90-bf16-rows-add",
         "sparse-sm80-fp16-rows-add-1row", "sparse-sm90-bf16-decode-finish", "sparse-sm90-bf16-densify", "sparse-sm90-bf16-gather", "c3a-sm90-bf16-circulant",
         "c3a-sm90-bf16-diagonal-sums", "multi-sm90-bf16-forward-sgmv",
         "multi-sm90-bf16-decode-bgmv", "multi-sm90-bf16-decode-pair", "multi-sm90-bf16-decode-finish", "multi-sm80-fp16-grad-x-sgmv", "multi-sm90-bf16-shrink-sgmv",
         "multi-sm90-bf16-shrink-bgmv", "multi-sm90-bf16-grad-grouped", "multi-sm90-bf16-delta-sgmv",
         "multi-sm90-bf16-delta-bgmv", "multi-sm90-bf16-weight-delta-rows", "multi-sm80-fp16-weight-delta-rows"]


@pytest.mark.parametrize("name", NAMES + PLAN_NAMES)
def test_kernel_compiles_for_gpu(compiled, name):
    k = compiled[name]
    assert k["cubin_bytes"] > 0
    assert k["has_mma"], f"{name}: no {k['expected_mma']} instruction in the PTX"
    if k["expected_mma"] == "wgmma":  # the compute-bound GEMMs must be software-pipelined
        assert k["pipelined"], f"{name}: the K loop's loads are not asynchronous (no pipelining)"
    assert k["shared"] <= (227 if k["arch"] == 90 else 163) * 1024, k
    assert k["spill_bytes"] in (None, 0), f"{name}: {k['spill_bytes']} bytes of register spills"


if __name__ == "__main__":
    main()
