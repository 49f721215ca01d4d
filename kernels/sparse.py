"""Sparse-delta (SHiRA) path: a GEMM whose weight tile gets the adapter's
nonzeros merged in registers, and the sampled product of the value gradient.

    forward   y  = x (W + s S)^T + b           sparse_matmul_kernel, B = W^T, delta S^T
              (1..16 rows: the base GEMM, then sparse_rows_add_kernel over S's CSR rows;
              the default above 16 rows: W + s S formed in one pass by
              sparse_densify_kernel, then cuBLAS)
    backward  dx = dy (W + s S)                sparse_matmul_kernel, B = W,   delta S
              dv = s * (dy^T x)[rows, cols]    sddmm_kernel (only at the nonzeros); the default
              path above 16 rows reads it off cuBLAS's dy^T x with sparse_gather_kernel
              dW = dy^T x                      plain GEMM (fusedlora.launch.matmul)

The nonzeros come in the tile-bucketed layout of fusedlora.sparse: square
layout tiles of TILE x TILE over W (N x K), bucket (tn, tk) holding the
nonzeros with row // TILE == tn and col // TILE == tk, stored contiguously
from offsets[tn * NUM_TK + tk] (``rows``, ``cols`` absolute; ``perm`` maps a
layout position to the index of its value in the user's ``values``).

Merging into the weight tile: in the reduction loop, the program that owns
the (BLOCK_K x BLOCK_N) tile of B adds the nonzeros of the layout buckets
that tile covers before tl.dot. A register tile cannot be scattered into, so
a chunk of BLOCK_E nonzeros becomes the dense tile P_red @ P_out, a product
of two one-hot matrices (BLOCK_K x BLOCK_E with the scaled values,
BLOCK_E x BLOCK_N of 0/1) on the tensor cores; no pair repeats, so every
element of the product has at most one term. Cost per chunk BLOCK_K *
BLOCK_E * BLOCK_N, i.e. density * BLOCK_K * BLOCK_N / BLOCK_M relative to
the base dot: small for SHiRA's densities (~1-2 %), and the extra memory
traffic is only the nonzeros. The same layout serves both directions: the
bucket of an (output tile, reduction tile) pair is found through two bucket
strides, (NUM_TK, 1) forward and (1, NUM_TK) for dx.
"""
import triton
import triton.language as tl

from .tiles import add_bias, csr_rows_dot, split_k_range, split_sum, store_tile, swizzle_tile


@triton.jit
def sparse_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    off_ptr, red_idx_ptr, out_idx_ptr, perm_ptr, val_ptr,
    M, N, K, M_BUCKET, NUM_TN, NUM_TK,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    bucket_stride_n, bucket_stride_k, scaling,
    HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A @ (B + scaling * D) + bias, A (M x K), B (K x N), D sparse.

    D[red_idx[p], out_idx[p]] = val[perm[p]] for the layout positions p;
    NUM_TN / NUM_TK count layout tiles along N (output) and K (reduction), and
    the bucket of layout tiles (tn, tk) is tn * bucket_stride_n + tk * bucket_stride_k.
    """
    tl.static_assert(BLOCK_N % TILE == 0)
    tl.static_assert(BLOCK_K % TILE == 0)
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_k = tl.arange(0, BLOCK_K)
    local_n = tl.arange(0, BLOCK_N)

    tiles_per_split, k_first = split_k_range(K, pid_k, BLOCK_K, SPLIT_K)
    offs_k = k_first + local_k
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        k0 = k_first + t * BLOCK_K
        k_ok = offs_k < K
        a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        if HAS_DELTA:
            delta = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(BLOCK_N // TILE):
                tn = pid_n * (BLOCK_N // TILE) + j
                for i in tl.static_range(BLOCK_K // TILE):
                    tk = k0 // TILE + i
                    ok = (tn < NUM_TN) & (tk < NUM_TK)
                    bucket = tn * bucket_stride_n + tk * bucket_stride_k
                    start = tl.load(off_ptr + bucket, mask=ok, other=0)
                    end = tl.load(off_ptr + bucket + 1, mask=ok, other=0)
                    for e0 in range(start, end, BLOCK_E):
                        offs_e = e0 + tl.arange(0, BLOCK_E)
                        e_ok = offs_e < end
                        rk = tl.load(red_idx_ptr + offs_e, mask=e_ok, other=-1) - k0
                        rn = tl.load(out_idx_ptr + offs_e, mask=e_ok, other=-1) - pid_n * BLOCK_N
                        src = tl.load(perm_ptr + offs_e, mask=e_ok, other=0)
                        v = tl.load(val_ptr + src, mask=e_ok, other=0.0).to(tl.float32) * scaling
                        p_red = tl.where(local_k[:, None] == rk[None, :], v[None, :], 0.0)
                        p_out = tl.where(rn[:, None] == local_n[None, :], 1.0, 0.0)
                        delta = tl.dot(p_red.to(DOT_DTYPE), p_out.to(DOT_DTYPE), delta,
                                       input_precision=INPUT_PRECISION)
            b = b.to(tl.float32) + delta
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        offs_k += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        if pid_k == 0:
            acc = add_bias(acc, bias_ptr, offs_n, N)

    store_tile(c_ptr, offs_m, offs_n, stride_cm, stride_cn, M, N, acc, SPLIT_K)


@triton.jit
def sddmm_kernel(
    dy_ptr, x_ptr, rows_ptr, cols_ptr, perm_ptr, out_ptr,
    M, NNZ, ROWS_PER_SPLIT,
    stride_dym, stride_dyn, stride_xm, stride_xk, scaling,
    SPLIT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[perm[p]] = scaling * sum_m dy[m, rows[p]] * x[m, cols[p]] for a chunk of
    BLOCK_E layout positions p; program axis 1 splits M, its partials added
    atomically into a zeroed float32 out when SPLIT_M > 1.

    Consecutive layout positions lie in one TILE x TILE bucket, so a chunk's
    gathers from dy and x touch a narrow band of columns of each row.
    """
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < NNZ
    # 64-bit: a transposed dy or x (column stride M) puts rows * stride past 2**31
    rows = tl.load(rows_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
    m_first = tl.program_id(1) * ROWS_PER_SPLIT
    m_end = tl.minimum(m_first + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for m0 in range(m_first, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < m_end) & e_ok[None, :]
        row_m = offs_m[:, None].to(tl.int64)
        g = tl.load(dy_ptr + row_m * stride_dym + rows[None, :] * stride_dyn, mask=mask, other=0.0)
        xv = tl.load(x_ptr + row_m * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
    acc = acc * scaling
    dst = tl.load(perm_ptr + offs_e, mask=e_ok, other=0)
    if SPLIT_M == 1:
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=e_ok)
    else:
        tl.atomic_add(out_ptr + dst, acc, mask=e_ok)


@triton.jit
def sparse_rows_add_kernel(
    y_ptr, x_ptr, row_ptr, col_ptr, val_ptr, order_ptr,
    M, N, stride_ym, stride_yn, stride_xm, stride_xk, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """y[m, n] += scaling * sum_i val[order[i]] x[m, col[i]] over row n's nonzeros (CSR), for a
    few rows of x (decode), into a float32 y (a base GEMM's output, rounded once after)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    acc = csr_rows_dot(x_ptr, row_ptr, col_ptr, val_ptr, order_ptr, offs_m, m_ok, offs_n, n_ok, stride_xm,
                         stride_xk, BLOCK_M, BLOCK_N, BLOCK_E)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + scaling * acc, mask=mask)


@triton.jit
def sparse_decode_finish_kernel(
    part_ptr, x_ptr, row_ptr, col_ptr, val_ptr, order_ptr, bias_ptr, c_ptr,
    M, N, R_COLS, stride_ps, stride_pm, stride_xm, stride_xk, stride_cm, stride_cn, scaling,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """The second launch of the sparse decode pair: C = the base GEMM's K-split partials
    (launch.decode_partials, summed in a fixed order) + bias + scaling * (S x^T)^T from the
    CSR rows, rounded once. W is streamed once and never merged into."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    mask = m_ok[:, None] & n_ok[None, :]
    acc = scaling * csr_rows_dot(x_ptr, row_ptr, col_ptr, val_ptr, order_ptr, offs_m, m_ok, offs_n, n_ok,
                                   stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_E)
    acc += split_sum(part_ptr, offs_m, (R_COLS + offs_n)[None, :], mask, stride_ps, stride_pm, SPLIT_K)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def sparse_densify_kernel(
    out_ptr, weight_ptr, offsets_ptr, rows_ptr, cols_ptr, perm_ptr, val_ptr,
    N, K, NUM_TK, stride_out_n, stride_out_k, stride_w_n, stride_w_k, scaling,
    TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out = weight + scaling * S in one pass: a program copies a TILE x BLOCK_K tile of
    weight into out, then rewrites the tile's nonzeros (the layout buckets it covers, one
    contiguous run of positions) as weight + scaling * val[perm], summed in float32 and
    rounded once. The positions are distinct, so no atomics; the barrier orders the
    tile's stores before the nonzeros' stores to the same addresses. Against a copy of
    W followed by a scatter kernel: one launch and no second pass over the nonzeros."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * TILE + tl.arange(0, TILE)).to(tl.int64)  # W may hold more than 2**31 elements
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tile = tl.load(weight_ptr + offs_n[:, None] * stride_w_n + offs_k[None, :] * stride_w_k, mask=mask)
    tl.store(out_ptr + offs_n[:, None] * stride_out_n + offs_k[None, :] * stride_out_k, tile, mask=mask)
    tl.debug_barrier()
    row_start = pid_n * NUM_TK
    first = row_start + pid_k * (BLOCK_K // TILE)
    last = tl.minimum(first + BLOCK_K // TILE, row_start + NUM_TK)
    start = tl.load(offsets_ptr + first).to(tl.int64)  # positions may pass 2**31
    end = tl.load(offsets_ptr + last).to(tl.int64)
    for e0 in range(start, end, BLOCK_E):
        p = e0 + tl.arange(0, BLOCK_E)
        ok = p < end
        r = tl.load(rows_ptr + p, mask=ok, other=0).to(tl.int64)
        c = tl.load(cols_ptr + p, mask=ok, other=0).to(tl.int64)
        v = tl.load(val_ptr + tl.load(perm_ptr + p, mask=ok, other=0), mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + r * stride_w_n + c * stride_w_k, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * stride_out_n + c * stride_out_k, (w + scaling * v).to(out_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def sparse_gather_kernel(
    out_ptr, g_ptr, rows_ptr, cols_ptr, perm_ptr,
    NNZ, stride_g_n, stride_g_k, scaling,
    BLOCK_E: tl.constexpr,
):
    """out[perm[p]] = scaling * g[rows[p], cols[p]] in out's dtype: the value gradient
    sampled from a dense dY^T X, written in the user's order of the values."""
    offs = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = offs < NNZ
    r = tl.load(rows_ptr + offs, mask=ok, other=0).to(tl.int64)
    c = tl.load(cols_ptr + offs, mask=ok, other=0).to(tl.int64)
    g = tl.load(g_ptr + r * stride_g_n + c * stride_g_k, mask=ok, other=0.0).to(tl.float32)
    dst = tl.load(perm_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + dst, (g * scaling).to(out_ptr.dtype.element_ty), mask=ok)
