"""Tile helpers shared by every adapter path's kernels."""
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """Keep-mask of inverted dropout for element (row, col) of a logical matrix.

    The mask is a pure function of (seed, row, col): the forward pass, the
    backward pass and the test helper that materialises it all draw the same
    bits without a stored mask tensor. Row and column are separate Philox
    counters, so any matrix up to 2^31 x 2^31 gets distinct streams.
    """
    rows_b = rows + cols * 0
    cols_b = cols + rows * 0
    bits, _, _, _ = tl.philox(seed, cols_b.to(tl.int32), rows_b.to(tl.int32), 0, 0)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def swizzle_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a flat program id to (pid_m, pid_n) in groups of GROUP_M row tiles,
    so consecutive programs share the same weight columns while they sit in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """Masked load of the (rows x cols) tile; out-of-range elements read 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def split_k_range(K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """(tiles in this program's share of the reduction, its first k): split
    SPLIT_K ways at whole BLOCK_K tiles; the last shares may run past K (masked)."""
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    return tiles_per_split, pid_k * tiles_per_split * BLOCK_K


@triton.jit
def add_bias(acc, bias_ptr, offs_n, N):
    bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc + bias.to(tl.float32)[None, :]


@triton.jit
def store_rows(c_ptr, rows, row_ok, offs_n, stride_cm, stride_cn, N, acc, SPLIT_K: tl.constexpr):
    """Write a GEMM's fp32 accumulator tile to rows ``rows`` of C: cast and store,
    or, when the reduction is split over programs, add it atomically into a
    zeroed fp32 C."""
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask)


@triton.jit
def store_tile(c_ptr, offs_m, offs_n, stride_cm, stride_cn, M, N, acc, SPLIT_K: tl.constexpr):
    """store_rows for the contiguous row tile offs_m."""
    store_rows(c_ptr, offs_m, offs_m < M, offs_n, stride_cm, stride_cn, N, acc, SPLIT_K)


@triton.jit
def split_dot_store(x_ptr, b_ptr, part_ptr, M, NB, K, first_n, col0, pid_k,
                    stride_xm, stride_xk, stride_bn, stride_bk, stride_ps, stride_pm,
                    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[pid_k, m, col0 + j] = sum over split pid_k's share of K of x[m, k] b[first_n + j, k],
    for the BLOCK_N rows of b (NB in all) from first_n: one (column tile, K split) of the
    decode kernels, whose splits store fp32 partials side by side (plain stores, no
    zeroed buffer) for a finishing kernel to sum in a fixed order."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = first_n + offs_j
    tiles, k_first = split_k_range(K, pid_k, BLOCK_K, SPLIT_K)
    offs_k = k_first + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < NB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles):
        k_ok = offs_k < K
        a = tl.load(x_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        offs_k += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_bk
    out = part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + (col0 + offs_j)[None, :]
    tl.store(out, acc, mask=m_ok & n_ok)


@triton.jit
def split_sum(part_ptr, offs_m, cols, mask, stride_ps, stride_pm, SPLIT_K: tl.constexpr):
    """sum over the K splits, in order, of part[s, offs_m, cols] (fp32; cols broadcast
    against offs_m[:, None]): the finishing kernels' read of split_dot_store's partials."""
    ptrs = part_ptr + offs_m[:, None] * stride_pm + cols
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    return acc


@triton.jit
def dropout_materialize_kernel(out_ptr, M, N, stride_m, stride_n, p, seed,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask (1.0 kept, 0.0 dropped) that dropout_keep draws;
    used to check kernels against the reference, never on the hot path."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rows[:, None], cols[None, :], p)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_n
    tl.store(ptrs, keep.to(tl.float32), mask=mask)


@triton.jit
def csr_rows_dot(x_ptr, row_ptr, col_ptr, val_ptr, order_ptr, offs_m, m_ok, offs_n, n_ok, stride_xm, stride_xk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """sum_i val[order[i]] x[m, col[i]] over output feature n's nonzeros (CSR rows), float32
    (BLOCK_M x BLOCK_N): only those features' nonzeros are read, and x (a few KB) from cache.
    The values stay in the user's order and dtype (no per-call gather; the order load runs
    beside the column's, so the chain of dependent loads is no longer)."""
    start = tl.load(row_ptr + offs_n, mask=n_ok, other=0)
    end = tl.load(row_ptr + offs_n + 1, mask=n_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    longest = tl.max(end - start, axis=0)
    for e in range(0, longest, BLOCK_E):
        idx = start[:, None] + e + tl.arange(0, BLOCK_E)[None, :]            # (BLOCK_N, BLOCK_E)
        ok = idx < end[:, None]
        col = tl.load(col_ptr + idx, mask=ok, other=0)
        val = tl.load(val_ptr + tl.load(order_ptr + idx, mask=ok, other=0), mask=ok, other=0.0).to(tl.float32)
        xg = tl.load(x_ptr + offs_m[:, None, None].to(tl.int64) * stride_xm + col[None, :, :] * stride_xk,
                     mask=m_ok[:, None, None] & ok[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * val[None, :, :], axis=2)
    return acc


@triton.jit
def rank_dots(acc, u_rows, q_rows, rank, seg_ok, n_ok, stride_ur, stride_qr,
              DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + u[rows, :rank] @ Q[:rank, n-tile] (u_rows: the rows' pointers (M, 1), q_rows: the
    columns' (1, N), both at rank 0), BLOCK_R ranks per dot: large or stacked ranks loop,
    so the tiles stay inside shared memory."""
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        u = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=seg_ok[:, None] & r_ok[None, :], other=0.0)
        q = tl.load(q_rows + offs_r[:, None].to(tl.int64) * stride_qr, mask=r_ok[:, None] & n_ok, other=0.0)
        acc = tl.dot(u.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc
