"""LoRA path: one GEMM kernel with a low-rank epilogue, and a two-launch pair for decode rows.

    C = alpha * drop_a(A) @ drop_b(B) + bias + drop_epi(U @ V)

Every matrix product of a LoRA layer is an instance (see fusedlora.launch):

    forward   u  = s * drop(x) @ lora_A^T          (shrink, split-K, fp32 out)
              y  = x @ W^T + b + u @ lora_B^T      (base GEMM, rank-r epilogue)
    backward  g  = s * dy @ lora_B                 (shrink)
              dx = dy @ W + drop(g @ lora_A)       (one GEMM pass, rank-r epilogue)
              dA = g^T @ drop(x),  dB = dy^T @ u,  dW = dy^T @ x

Dropout is inverted dropout on the adapter input x, drawn from (seed, row,
col) of x by tiles.dropout_keep, so no mask is ever stored. SPLIT_K > 1
splits the reduction over programs that add fp32 partials atomically into a
zeroed C: the memory-bound shapes (decode rows, rank-r outputs) need it to
fill the GPU.
"""
import triton
import triton.language as tl

from .tiles import (add_bias, dropout_keep, load_tile, rank_dots, split_dot_store, split_k_range, split_sum,
                    store_tile, swizzle_tile)


@triton.jit
def lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, u_ptr, v_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_um, stride_ur, stride_vr, stride_vn,
    alpha, p, keep_scale, seed,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, DROP_EPI: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    tiles_per_split, k_first = split_k_range(K, pid_k, BLOCK_K, SPLIT_K)
    offs_k = k_first + tl.arange(0, BLOCK_K)
    # 64-bit offsets: M * stride passes 2^31 on long prefills, and so does
    # k * stride of a transposed operand (dy^T in the weight gradients).
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        k_ok = offs_k < K
        a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        if DROP_A:
            keep = dropout_keep(seed, offs_m[:, None], offs_k[None, :], p)
            a = tl.where(keep, a * keep_scale, 0.0)
        if DROP_B:
            keep = dropout_keep(seed, offs_k[:, None], offs_n[None, :], p)
            b = tl.where(keep, b * keep_scale, 0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        offs_k += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * alpha

    # The epilogue runs once per output tile: in the first split only.
    if pid_k == 0:
        if HAS_LOWRANK:
            low = rank_dots(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_ptr + offs_m[:, None] * stride_um,
                            v_ptr + offs_n[None, :] * stride_vn, R, offs_m < M, offs_n[None, :] < N, stride_ur,
                            stride_vr, DOT_DTYPE, INPUT_PRECISION, BLOCK_R)
            if DROP_EPI:
                keep = dropout_keep(seed, offs_m[:, None], offs_n[None, :], p)
                low = tl.where(keep, low * keep_scale, 0.0)
            acc += low
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, offs_n, N)

    store_tile(c_ptr, offs_m, offs_n, stride_cm, stride_cn, M, N, acc, SPLIT_K)


# ---------------------------------------------------------------------------
# Decode (M <= BLOCK_M rows, no dropout): two launches, no memset. At a few rows the
# layer streams W once and every dependent launch (or memset) in a CUDA graph costs a
# few microseconds, as much as a tenth of that stream; the split-K path above needs
# five (zeroed u, shrink, zeroed C, GEMM, cast).
#
#   lora_decode_kernel         [u_parts | y_parts] = x [A; W]^T: the output columns of the
#                              shrink (R, padded to whole tiles) and of the base GEMM in one
#                              grid, each (column tile, K split) storing its fp32 partials
#                              into its own slice of a buffer (plain stores: nothing to
#                              zero); the shrink's tiles run beside W's, not before them
#   lora_decode_finish_kernel  y = sum of the splits + bias + (s u) B^T, summed in a fixed
#                              order (deterministic); its first program stores u = s x A^T


@triton.jit
def lora_decode_kernel(
    x_ptr, weight_ptr, lora_a_ptr, part_ptr,
    M, N, K, R, R_TILES,
    stride_xm, stride_xk, stride_weight_n, stride_weight_k, stride_lora_a_r, stride_lora_a_k, stride_ps, stride_pm,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (tile, K split): tiles 0 .. R_TILES-1 are the shrink's columns (rows of A),
    the rest W's; part's columns are [R_TILES * BLOCK_N of u | N of y]."""
    tile = tl.program_id(0) // SPLIT_K
    pid_k = tl.program_id(0) % SPLIT_K
    if tile < R_TILES:
        split_dot_store(x_ptr, lora_a_ptr, part_ptr, M, R, K, tile * BLOCK_N, tile * BLOCK_N, pid_k,
                        stride_xm, stride_xk, stride_lora_a_r, stride_lora_a_k, stride_ps, stride_pm,
                        DOT_DTYPE, INPUT_PRECISION, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        first = (tile - R_TILES) * BLOCK_N
        split_dot_store(x_ptr, weight_ptr, part_ptr, M, N, K, first, R_TILES * BLOCK_N + first, pid_k,
                        stride_xm, stride_xk, stride_weight_n, stride_weight_k, stride_ps, stride_pm,
                        DOT_DTYPE, INPUT_PRECISION, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def lora_decode_finish_kernel(
    part_ptr, lora_b_ptr, bias_ptr, u_ptr, c_ptr,
    M, N, R, R_COLS,
    stride_ps, stride_pm, stride_lora_b_n, stride_lora_b_r, stride_cm, stride_cn, scaling,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C[:, tile] = sum_s part[s, :, R_COLS + tile] + bias + u lora_B^T with u = scaling *
    sum_s part[s, :, :R]; program 0 also stores u (M x R, fp32)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m[:, None] < M
    y_ok = m_ok & (offs_n[None, :] < N)
    acc = split_sum(part_ptr, offs_m, (R_COLS + offs_n)[None, :], y_ok, stride_ps, stride_pm, SPLIT_K)
    for r0 in range(0, R, BLOCK_R):  # BLOCK_R ranks at a time: large ranks loop, tiles stay small
        offs_r = r0 + tl.arange(0, BLOCK_R)
        u_ok = m_ok & (offs_r[None, :] < R)
        u = split_sum(part_ptr, offs_m, offs_r[None, :], u_ok, stride_ps, stride_pm, SPLIT_K) * scaling
        if pid == 0:
            tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :], u, mask=u_ok)
        v = load_tile(lora_b_ptr, offs_r, offs_n, stride_lora_b_r, stride_lora_b_n, R, N)
        acc = tl.dot(u.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, N)
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=y_ok)
