"""Multi-adapter path: every row of a batch picks its own LoRA adapter.

The LoRA adapters of a layer live in one pool (fusedlora.routing.AdapterPool):
the rows of every A (r x K) stacked in P_A (R_total x K) and the rows of every
B^T (r x N) stacked in P_B (R_total x N); adapter slot s owns pool rows
off[s] .. off[s] + rank[s] - 1 in both, with its scale in scale[s]. Ranks
differ freely: nothing is padded to the largest rank. Row m of the batch is
routed to slot[m] (-1: base only; a slot of rank 0, such as a C3A or sparse
adapter whose delta is added elsewhere, does no LoRA work either).

Products (fusedlora.multi launches them):

    forward   u[m]  = scale[s] * x[m] P_A[s]^T          multi_shrink_kernel
              y[m]  = x[m] W^T + b + u[m] P_B[s]         multi_matmul_kernel (epilogue)
    backward  g[m]  = scale[s] * dy[m] P_B[s]^T         multi_shrink_kernel
              dx[m] = dy[m] W + g[m] P_A[s]             multi_matmul_kernel (epilogue)
              dP_A[s] = g[rows of s]^T x[rows of s]     multi_grad_kernel
              dP_B[s] = u[rows of s]^T dy[rows of s]    multi_grad_kernel

with P[s] the rank[s] pool rows of slot s, and u, g (M x R_MAX, float32)
indexed by the row's natural position.

Two row orders:

* BGMV (gather, ``SORTED=False``): rows in their natural order. The shrink
  runs one program per (row, rank chunk, K split) and the expand epilogue
  adds rank-1 updates u[:, j] (x) P_B[off[row] + j] gathered per row, j up
  to the largest rank in the tile, each row masked at its own rank: for
  decode batches, where no two rows need to share an adapter and the
  product is memory-bound. No sort, no host work.
* SGMV (segmented, ``SORTED=True``): rows visited in the order ``perm`` of a
  device-side stable sort by slot, so that rows of one adapter are
  contiguous (a segment): sorted[p] is the slot at sorted position p and
  ends[s + 1] one past the last position of slot s (ends[0]: of the -1
  rows). A tile of BLOCK_M sorted positions walks the (few) segments it
  intersects, each to the next through ends, and runs each as a
  tensor-core dot with that adapter's rows: for prefill.
  A tile that intersects more than SEG_DOT_MAX segments (a fragmented
  batch) falls back to the per-row gather of the BGMV path for that tile
  only, decided at run time. x is read and y written through ``perm``: no
  permuted copy of either is made.

Neither path needs the number of segments or of rows per adapter on the
host: the grids depend only on M, the pool's slot count and its largest
rank, so a forward never synchronises with the host (CUDA-graph capturable).
The gradient kernel covers one (slot, rank chunk, column tile) per program
and loops over that slot's rows [start[s], end[s]) of the sorted order,
optionally split over SPLIT_M programs that add fp32 partials atomically.
"""
import triton
import triton.language as tl

from .tiles import add_bias, csr_rows_dot, dropout_keep, rank_dots, split_dot_store, split_sum, store_rows, swizzle_tile


@triton.jit
def _segment_end(sorted_ptr, ends_ptr, pos, hi, S):
    """(slot, end) of the segment at sorted position pos of a tile ending at hi: end is one
    past its last position in the tile (at least pos + 1). Slots outside [-1, S) (unchecked
    callers) end at the tile's end; the caller skips any slot outside [0, S)."""
    slot = tl.load(sorted_ptr + pos)
    end = tl.load(ends_ptr + tl.minimum(tl.maximum(slot + 1, 0), S))
    end = tl.where(slot >= S, hi, end)
    return slot, tl.maximum(tl.minimum(end, hi), pos + 1)


@triton.jit
def _tile_segments(sorted_ptr, lo, hi, BLOCK_M: tl.constexpr):
    """How many segments the sorted positions [lo, hi) meet (slot changes + 1)."""
    offs = lo + 1 + tl.arange(0, BLOCK_M)
    ok = offs < hi
    cur = tl.load(sorted_ptr + offs, mask=ok, other=0)
    prev = tl.load(sorted_ptr + offs - 1, mask=ok, other=0)
    return 1 + tl.sum((ok & (cur != prev)).to(tl.int32), axis=0)


@triton.jit
def _shrink_row(x_ptr, p_ptr, u_ptr, slot_ptr, off_ptr, rank_ptr, scale_ptr, drop_ptr, seed,
                row, r0, k_first, k_tiles, K,
                stride_xm, stride_xk, stride_pr, stride_pk, stride_um, stride_ur,
                DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[row, r0 : r0 + BLOCK_R] (+)= scale * drop(x[row, k-range]) . P[off + j, k-range] for one row (BGMV)."""
    slot = tl.load(slot_ptr + row)
    if slot >= 0:
        rank = tl.load(rank_ptr + slot)
        if r0 < rank:
            off = tl.load(off_ptr + slot)
            p = tl.load(drop_ptr + slot)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_k = k_first + tl.arange(0, BLOCK_K)
            x_row = x_ptr + row.to(tl.int64) * stride_xm
            p_rows = p_ptr + (off + offs_r)[:, None].to(tl.int64) * stride_pr
            acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for t in range(0, k_tiles):
                k_ok = offs_k < K
                xv = tl.load(x_row + offs_k.to(tl.int64) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
                if DROPOUT:
                    xv = tl.where(dropout_keep(seed, row, offs_k, p), xv / (1.0 - p), 0.0)
                pv = tl.load(p_rows + offs_k[None, :].to(tl.int64) * stride_pk, mask=r_ok[:, None] & k_ok[None, :],
                             other=0.0)
                acc += tl.sum(pv.to(tl.float32) * xv[None, :], axis=1)
                offs_k += BLOCK_K
            acc = acc * tl.load(scale_ptr + slot)
            u_ptrs = u_ptr + row.to(tl.int64) * stride_um + offs_r * stride_ur
            if SPLIT_K == 1:
                tl.store(u_ptrs, acc, mask=r_ok)
            else:
                tl.atomic_add(u_ptrs, acc, mask=r_ok)


@triton.jit
def multi_shrink_kernel(
    x_ptr, p_ptr, u_ptr, slot_ptr, perm_ptr, sorted_ptr, ends_ptr, off_ptr, rank_ptr, scale_ptr, drop_ptr,
    M, K, S,
    stride_xm, stride_xk, stride_pr, stride_pk, stride_um, stride_ur, seed,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SORTED: tl.constexpr, DROPOUT: tl.constexpr,
    SEG_DOT_MAX: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """u[m, j] = scale[s] * sum_k drop(x)[m, k] P[off[s] + j, k] for j < rank[s], s = slot[m].

    DROPOUT: inverted dropout of x with the slot's probability drop[s], drawn
    from (seed, m, k) by tiles.dropout_keep, as the single-adapter path does.

    u is float32, zeroed by the launcher (it is also the atomic target when
    SPLIT_K > 1); columns j >= rank[s] and rows of slot -1 stay zero.
    Grid: (M or cdiv(M, BLOCK_M) when SORTED, cdiv(R_MAX, BLOCK_R), SPLIT_K).
    """
    r0 = tl.program_id(1) * BLOCK_R
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_first = tl.program_id(2) * k_tiles * BLOCK_K
    if SORTED:
        lo = tl.program_id(0) * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, M)
        if _tile_segments(sorted_ptr, lo, hi, BLOCK_M) <= SEG_DOT_MAX:
            offs_p = lo + tl.arange(0, BLOCK_M)
            start = lo
            while start < hi:
                slot, end = _segment_end(sorted_ptr, ends_ptr, start, hi, S)
                if (slot >= 0) & (slot < S):
                    rank = tl.load(rank_ptr + slot)
                    if r0 < rank:
                        off = tl.load(off_ptr + slot)
                        p = tl.load(drop_ptr + slot)
                        p_ok = (offs_p >= start) & (offs_p < end)
                        rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
                        offs_r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = offs_r < rank
                        offs_k = k_first + tl.arange(0, BLOCK_K)
                        x_ptrs = (x_ptr + rows[:, None].to(tl.int64) * stride_xm
                                  + offs_k[None, :].to(tl.int64) * stride_xk)
                        p_ptrs = (p_ptr + (off + offs_r)[None, :].to(tl.int64) * stride_pr
                                  + offs_k[:, None].to(tl.int64) * stride_pk)
                        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                        for t in range(0, k_tiles):
                            k_ok = offs_k < K
                            a = tl.load(x_ptrs, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
                            if DROPOUT:
                                keep = dropout_keep(seed, rows[:, None], offs_k[None, :], p)
                                a = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0)
                            b = tl.load(p_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
                            offs_k += BLOCK_K
                            x_ptrs += BLOCK_K * stride_xk
                            p_ptrs += BLOCK_K * stride_pk
                        acc = acc * tl.load(scale_ptr + slot)
                        u_ptrs = u_ptr + rows[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur
                        if SPLIT_K == 1:
                            tl.store(u_ptrs, acc, mask=p_ok[:, None] & r_ok[None, :])
                        else:
                            tl.atomic_add(u_ptrs, acc, mask=p_ok[:, None] & r_ok[None, :])
                start = end
        else:
            for pos in range(lo, hi):
                _shrink_row(x_ptr, p_ptr, u_ptr, slot_ptr, off_ptr, rank_ptr, scale_ptr, drop_ptr, seed,
                            tl.load(perm_ptr + pos), r0, k_first, k_tiles, K,
                            stride_xm, stride_xk, stride_pr, stride_pk, stride_um, stride_ur,
                            DROPOUT, SPLIT_K, BLOCK_R, BLOCK_K)
    else:
        _shrink_row(x_ptr, p_ptr, u_ptr, slot_ptr, off_ptr, rank_ptr, scale_ptr, drop_ptr, seed,
                    tl.program_id(0), r0, k_first, k_tiles, K,
                    stride_xm, stride_xk, stride_pr, stride_pk, stride_um, stride_ur,
                    DROPOUT, SPLIT_K, BLOCK_R, BLOCK_K)


@triton.jit
def _gather_expand(acc, u_ptr, q_ptr, slot_ptr, off_ptr, rank_ptr, drop_ptr, seed, rows, pos_ok, offs_n, N,
                   stride_um, stride_ur, stride_qr, stride_qn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_EPI: tl.constexpr):
    """acc[i, :] += sum_{j < rank} u[rows[i], j] * Q[off + j, offs_n], adapter per row (BGMV):
    rank-1 updates up to the tile's largest rank, each row masked at its own. DROP_EPI applies
    the row's inverted dropout (probability drop[slot]) to the sum, at (row, column)."""
    slot = tl.load(slot_ptr + rows, mask=pos_ok, other=-1)
    has = pos_ok & (slot >= 0)
    s = tl.where(has, slot, 0)
    rank = tl.load(rank_ptr + s, mask=has, other=0)
    off = tl.load(off_ptr + s, mask=has, other=0)
    n_ok = offs_n[None, :] < N
    u_rows = u_ptr + rows.to(tl.int64) * stride_um
    q_rows = q_ptr + off.to(tl.int64)[:, None] * stride_qr + offs_n[None, :].to(tl.int64) * stride_qn
    if DROP_EPI:
        # dropout applies to the whole low-rank term of a row: sum it apart first
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, tl.max(rank, axis=0)):
            j_ok = j < rank
            uj = tl.load(u_rows + j * stride_ur, mask=j_ok, other=0.0)
            q = tl.load(q_rows + j * stride_qr, mask=j_ok[:, None] & n_ok, other=0.0)
            low += uj[:, None] * q.to(tl.float32)
        p = tl.load(drop_ptr + s, mask=has, other=0.0)[:, None]
        acc += tl.where(dropout_keep(seed, rows[:, None], offs_n[None, :], p), low / (1.0 - p), 0.0)
    else:
        for j in range(0, tl.max(rank, axis=0)):
            j_ok = j < rank
            uj = tl.load(u_rows + j * stride_ur, mask=j_ok, other=0.0)
            q = tl.load(q_rows + j * stride_qr, mask=j_ok[:, None] & n_ok, other=0.0)
            acc += uj[:, None] * q.to(tl.float32)
    return acc


@triton.jit
def _segment_dots(acc, u_ptr, q_ptr, sorted_ptr, ends_ptr, off_ptr, rank_ptr, drop_ptr, seed,
                  rows, offs_p, pos_ok, offs_n, pid_m, M, N, S, stride_um, stride_ur, stride_qr, stride_qn,
                  DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DROP_EPI: tl.constexpr):
    """SGMV epilogue: for each segment of the (sorted) tile and each rank chunk up to that
    segment's own rank, one tensor-core dot u[rows of the segment] @ Q[off + chunk, n-tile]."""
    n_ok = offs_n[None, :] < N
    lo = pid_m * BLOCK_M
    hi = tl.minimum(lo + BLOCK_M, M)
    start = lo
    while start < hi:
        slot, end = _segment_end(sorted_ptr, ends_ptr, start, hi, S)
        if (slot >= 0) & (slot < S):
            rank = tl.load(rank_ptr + slot)
            off = tl.load(off_ptr + slot)
            seg_ok = pos_ok & (offs_p >= start) & (offs_p < end)
            u_rows = u_ptr + rows[:, None].to(tl.int64) * stride_um
            q_rows = q_ptr + off.to(tl.int64) * stride_qr + offs_n[None, :].to(tl.int64) * stride_qn
            if DROP_EPI:
                # dropout applies to the segment's whole low-rank term: sum it apart first
                low = rank_dots(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), u_rows, q_rows, rank, seg_ok, n_ok,
                                 stride_ur, stride_qr, DOT_DTYPE, INPUT_PRECISION, BLOCK_R)
                p = tl.load(drop_ptr + slot)
                keep = dropout_keep(seed, rows[:, None], offs_n[None, :], p)
                acc += tl.where(keep, low / (1.0 - p), 0.0)
            else:
                # straight into acc: no second M x N register tile
                acc = rank_dots(acc, u_rows, q_rows, rank, seg_ok, n_ok, stride_ur, stride_qr, DOT_DTYPE,
                                 INPUT_PRECISION, BLOCK_R)
        start = end
    return acc


@triton.jit
def multi_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, u_ptr, q_ptr,
    slot_ptr, perm_ptr, sorted_ptr, ends_ptr, off_ptr, rank_ptr, drop_ptr,
    M, N, K, S, M_BUCKET, R_MAX,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_um, stride_ur, stride_qr, stride_qn, seed,
    HAS_BIAS: tl.constexpr, DROP_EPI: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SORTED: tl.constexpr, SEG_DOT_MAX: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, ADD_C: tl.constexpr = False,
):
    """C[m] = A[m] @ B + bias + u[m, :rank[s]] @ Q[off[s] : off[s] + rank[s]], s = slot[m].

    The base GEMM of the layer (forward: A = x, B = W^T, Q = P_B; dx: A = dy,
    B = W, Q = P_A) with every row's own adapter added in the epilogue of its
    output tile: no M x N intermediate. SORTED visits rows in the order perm
    (R_MAX, the pool's largest rank, only keys the autotuner). DROP_EPI (dx
    with dropout) applies each row's inverted dropout to its low-rank term.
    SEG_DOT_MAX > 0: a sorted tile meeting more segments than that takes the
    per-row gather instead of one dot per segment (small tiles only: the
    gather's BLOCK_M x BLOCK_N pointer tiles would spill at 128 x 256); 0:
    always one dot per segment (no gather code in the kernel).
    ADD_C (SPLIT_K = 1): C += that, read and written once per tile: with K = 0 this is the
    delta-only expand into a base output computed elsewhere (fusedlora.multi_delta).
    """
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_ok = offs_p < M
    if SORTED:
        rows = tl.load(perm_ptr + offs_p, mask=pos_ok, other=0)
    else:
        rows = offs_p

    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    n_ok = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, k_tiles):
        k_ok = offs_k < K
        a = tl.load(a_ptrs, mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        offs_k += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue, once per output tile (first K split only).
    if pid_k == 0:
        if SORTED:
            if SEG_DOT_MAX > 0:
                lo = pid_m * BLOCK_M
                if _tile_segments(sorted_ptr, lo, tl.minimum(lo + BLOCK_M, M), BLOCK_M) <= SEG_DOT_MAX:
                    acc = _segment_dots(acc, u_ptr, q_ptr, sorted_ptr, ends_ptr, off_ptr,
                                        rank_ptr, drop_ptr, seed, rows, offs_p, pos_ok, offs_n, pid_m, M, N, S,
                                        stride_um, stride_ur, stride_qr, stride_qn, DOT_DTYPE, INPUT_PRECISION,
                                        BLOCK_M, BLOCK_N, BLOCK_R, DROP_EPI)
                else:
                    acc = _gather_expand(acc, u_ptr, q_ptr, slot_ptr, off_ptr, rank_ptr, drop_ptr, seed, rows,
                                         pos_ok, offs_n, N, stride_um, stride_ur, stride_qr, stride_qn,
                                         BLOCK_M, BLOCK_N, DROP_EPI)
            else:
                acc = _segment_dots(acc, u_ptr, q_ptr, sorted_ptr, ends_ptr, off_ptr,
                                    rank_ptr, drop_ptr, seed, rows, offs_p, pos_ok, offs_n, pid_m, M, N, S,
                                    stride_um, stride_ur, stride_qr, stride_qn, DOT_DTYPE, INPUT_PRECISION,
                                    BLOCK_M, BLOCK_N, BLOCK_R, DROP_EPI)
        else:
            acc = _gather_expand(acc, u_ptr, q_ptr, slot_ptr, off_ptr, rank_ptr, drop_ptr, seed, rows, pos_ok,
                                 offs_n, N, stride_um, stride_ur, stride_qr, stride_qn, BLOCK_M, BLOCK_N, DROP_EPI)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if ADD_C:
            c_old = tl.load(c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn,
                            mask=pos_ok[:, None] & n_ok, other=0.0)
            acc += c_old.to(tl.float32)

    store_rows(c_ptr, rows, pos_ok, offs_n, stride_cm, stride_cn, N, acc, SPLIT_K)


@triton.jit
def multi_grad_kernel(
    l_ptr, r_ptr, out_ptr, perm_ptr, start_ptr, end_ptr, off_ptr, rank_ptr, drop_ptr,
    N, R_CHUNKS,
    stride_lm, stride_lr, stride_rm, stride_rn, stride_om, stride_on, seed,
    DROP_R: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[off[s] + j, n] (+)= sum over rows m of slot s of L[m, j] * R[m, n], j < rank[s].

    The rows of slot s are perm[start[s] : end[s]] (sorted order). Grid:
    (slots * R_CHUNKS, cdiv(N, BLOCK_N), SPLIT_M); with SPLIT_M > 1 the
    programs of a slot split its rows and add into a zeroed float32 out.
    Pool rows of no slot (and slots without rows) are left as they are.
    DROP_R: R is x under the slot's inverted dropout (the gradient of P_A).
    """
    slot = tl.program_id(0) // R_CHUNKS
    r0 = (tl.program_id(0) % R_CHUNKS) * BLOCK_R
    rank = tl.load(rank_ptr + slot)
    if r0 < rank:
        start = tl.load(start_ptr + slot)
        end = tl.load(end_ptr + slot)
        chunk = tl.cdiv(tl.cdiv(end - start, tl.num_programs(2)), BLOCK_M) * BLOCK_M
        lo = start + tl.program_id(2) * chunk
        hi = tl.minimum(lo + chunk, end)
        if lo < hi:
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            p = tl.load(drop_ptr + slot)
            acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            for p0 in range(lo, hi, BLOCK_M):
                offs_p = p0 + tl.arange(0, BLOCK_M)
                p_ok = offs_p < hi
                rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
                lt = tl.load(l_ptr + rows[None, :] * stride_lm + offs_r[:, None] * stride_lr,
                             mask=r_ok[:, None] & p_ok[None, :], other=0.0)
                rt = tl.load(r_ptr + rows[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                             mask=p_ok[:, None] & n_ok[None, :], other=0.0)
                if DROP_R:
                    keep = dropout_keep(seed, rows[:, None], offs_n[None, :], p)
                    rt = tl.where(keep, rt.to(tl.float32) / (1.0 - p), 0.0)
                acc = tl.dot(lt.to(DOT_DTYPE), rt.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
            off = tl.load(off_ptr + slot)
            ptrs = out_ptr + (off + offs_r)[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
            mask = r_ok[:, None] & n_ok[None, :]
            if SPLIT_M == 1:
                tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.atomic_add(ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------
# BGMV decode (M <= BLOCK_M rows, no dropout): two launches and no memset, as the
# single-adapter decode pair of kernels/lora.py (the split-K forward above needs five:
# zeroed u, shrink, zeroed C, GEMM, cast).
#
#   multi_decode_kernel         programs (row, rank chunk, K split) of the per-row shrink,
#                               then (column tile of W, K split): every split stores fp32
#                               partials in its own slice of part (M x [R_MAX | N] each)
#   multi_decode_finish_kernel  y = sum of the splits + bias + u[m] P_B[slot[m]] gathered per
#                               row, in rank chunks of BLOCK_R as one 3-D load each (not one
#                               dependent load per rank); its first program stores u, zero
#                               past each row's rank and on base-only rows


@triton.jit
def multi_decode_kernel(
    x_ptr, weight_ptr, pool_a_ptr, part_ptr, slot_ptr, off_ptr, rank_ptr, scale_ptr, drop_ptr,
    M, N, K, R_COLS, R_CHUNKS,
    stride_xm, stride_xk, stride_weight_n, stride_weight_k, stride_pool_a_r, stride_pool_a_k,
    stride_ps, stride_pm,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SHRINK_BLOCK_K: tl.constexpr,
):
    """Tiles 0 .. M * R_CHUNKS - 1: the shrink of (row, rank chunk) into part's first R_COLS
    columns (only where the row's slot has that rank); the rest: W's column tiles."""
    tile = tl.program_id(0) // SPLIT_K
    pid_k = tl.program_id(0) % SPLIT_K
    if tile < M * R_CHUNKS:
        k_tiles = tl.cdiv(tl.cdiv(K, SHRINK_BLOCK_K), SPLIT_K)
        _shrink_row(x_ptr, pool_a_ptr, part_ptr + pid_k * stride_ps, slot_ptr, off_ptr, rank_ptr, scale_ptr,
                    drop_ptr, 0, tile // R_CHUNKS, (tile % R_CHUNKS) * BLOCK_R, pid_k * k_tiles * SHRINK_BLOCK_K,
                    k_tiles, K, stride_xm, stride_xk, stride_pool_a_r, stride_pool_a_k, stride_pm, 1,
                    False, 1, BLOCK_R, SHRINK_BLOCK_K)
    else:
        first = (tile - M * R_CHUNKS) * BLOCK_N
        split_dot_store(x_ptr, weight_ptr, part_ptr, M, N, K, first, R_COLS + first, pid_k,
                        stride_xm, stride_xk, stride_weight_n, stride_weight_k, stride_ps, stride_pm,
                        DOT_DTYPE, INPUT_PRECISION, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def multi_decode_finish_kernel(
    part_ptr, q_ptr, bias_ptr, u_ptr, c_ptr, slot_ptr, off_ptr, rank_ptr,
    M, N, R_MAX, R_COLS,
    stride_ps, stride_pm, stride_qr, stride_qn, stride_um, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C[m, tile] = sum_s part[s, m, R_COLS + tile] + bias + u[m, :rank] Q[off : off + rank, tile]
    with u[m, j] = sum_s part[s, m, j] for j < rank of row m's slot (0 elsewhere)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1)
    has = m_ok & (slot >= 0)
    s = tl.where(has, slot, 0)
    rank = tl.load(rank_ptr + s, mask=has, other=0)
    off = tl.load(off_ptr + s, mask=has, other=0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = split_sum(part_ptr, offs_m, (R_COLS + offs_n)[None, :], m_ok[:, None] & n_ok[None, :], stride_ps,
                    stride_pm, SPLIT_K)
    for r0 in range(0, R_MAX, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r[None, :] < rank[:, None]
        u = split_sum(part_ptr, offs_m, offs_r[None, :], r_ok, stride_ps, stride_pm, SPLIT_K)
        if pid == 0:
            tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :], u,
                     mask=m_ok[:, None] & (offs_r[None, :] < R_MAX))
        q = tl.load(q_ptr + (off[:, None, None] + offs_r[None, :, None]).to(tl.int64) * stride_qr
                    + offs_n[None, None, :] * stride_qn, mask=r_ok[:, :, None] & n_ok[None, None, :], other=0.0)
        acc += tl.sum(u[:, :, None] * q.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, N)
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------- C3A and sparse rows of a routed batch
# One launch adds every C3A and sparse row's delta into y, whichever adapter each row
# uses: the adapters stay where they are (their parameters, the sparse layouts' CSR
# rows) and a per-slot table of int64 addresses (fusedlora.weight_delta_rows) says
# where. Row table entries: [kind, a0, a1, a2, a3, a4]
#   kind 1 (C3A):    a0 = kernel (N/b, K/b, b) float32, a1 = b, a2..a4 = its strides
#   kind 2 (sparse): a0 = CSR row_ptr int32 (N + 1), a1 = col int32, a2 = order int64
#                    (CSR position -> index of the value), a3 = values, a4 = their dtype
#                    (0 float32, 1 float16, 2 bfloat16); the scale is scale[slot]
TABLE_WIDTH = tl.constexpr(6)


@triton.jit
def _as_ptr(address, dtype: tl.constexpr):
    return address.to(tl.pointer_type(dtype), bitcast=True)


@triton.jit
def _c3a_row(x_row, w, bs, s0, s1, s2, offs_n, n_ok, K, stride_xk, BLOCK_K: tl.constexpr):
    """sum_k C[n, k] x[k] for the tile's outputs n, C[n, k] = w[n // b, k // b, (k % b - n % b) mod b]
    (unscaled), float32: the circulant gathered per K tile (it stays in cache)."""
    ob = offs_n // bs
    w_rows = w + ob.to(tl.int64) * s0
    s = offs_n - ob * bs
    acc = tl.zeros((offs_n.shape[0],), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xv = tl.load(x_row + offs_k.to(tl.int64) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        ib = offs_k // bs
        d = (offs_k - ib * bs)[None, :] - s[:, None]
        d = tl.where(d < 0, d + bs, d)
        circ = tl.load(w_rows[:, None] + ib[None, :].to(tl.int64) * s1 + d.to(tl.int64) * s2,
                       mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(circ * xv[None, :], axis=1)
    return acc


@triton.jit
def multi_weight_delta_rows_kernel(
    c_ptr, x_ptr, slot_ptr, table_ptr, scale_ptr,
    N, K, inv_k, stride_cm, stride_cn, stride_xm, stride_xk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """C[m, tile] += the delta of row m's C3A or sparse adapter (x[m] dW^T / K, or
    scale * x[m] S^T), rounded once with C; rows of other slots (LoRA, -1) return at once."""
    m = tl.program_id(1)
    slot = tl.load(slot_ptr + m)
    if slot >= 0:
        row = table_ptr + slot * TABLE_WIDTH
        kind = tl.load(row)
        if kind != 0:
            offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            x_row = x_ptr + m.to(tl.int64) * stride_xm
            a0 = tl.load(row + 1)
            a1 = tl.load(row + 2)
            a2 = tl.load(row + 3)
            a3 = tl.load(row + 4)
            a4 = tl.load(row + 5)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if kind == 1:
                acc = _c3a_row(x_row, _as_ptr(a0, tl.float32), a1.to(tl.int32), a2, a3, a4, offs_n, n_ok, K,
                               stride_xk, BLOCK_K) * inv_k
            else:
                row_ptr = _as_ptr(a0, tl.int32)
                col = _as_ptr(a1, tl.int32)
                order = _as_ptr(a2, tl.int64)
                one = tl.arange(0, 1)
                if a4 == 0:
                    part = csr_rows_dot(x_row, row_ptr, col, _as_ptr(a3, tl.float32), order, one, one < 1,
                                          offs_n, n_ok, 0, stride_xk, 1, BLOCK_N, BLOCK_E)
                elif a4 == 1:
                    part = csr_rows_dot(x_row, row_ptr, col, _as_ptr(a3, tl.float16), order, one, one < 1,
                                          offs_n, n_ok, 0, stride_xk, 1, BLOCK_N, BLOCK_E)
                else:
                    part = csr_rows_dot(x_row, row_ptr, col, _as_ptr(a3, tl.bfloat16), order, one, one < 1,
                                          offs_n, n_ok, 0, stride_xk, 1, BLOCK_N, BLOCK_E)
                acc = tl.sum(part, axis=0) * tl.load(scale_ptr + slot)
            c = c_ptr + m.to(tl.int64) * stride_cm + offs_n.to(tl.int64) * stride_cn
            tl.store(c, (tl.load(c, mask=n_ok, other=0.0).to(tl.float32) + acc).to(c_ptr.dtype.element_ty),
                     mask=n_ok)
