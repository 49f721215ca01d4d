// Fused LoRA decode (M <= 16 rows): y = x W^T + b + (s x A^T) B^T, with one
// adapter for all rows or one per row (BGMV: pooled adapters of any ranks).
//
// At decode time the layer is a matrix-vector problem bound by HBM
// bandwidth: the goal is to stream W exactly once with wide loads and hide
// the adapter behind it. Two kernels:
//   lora_shrink      u = s * x A^T (M x R, fp32): tiny, split over K with atomics
//   lora_gemv        each warp owns kRowsPerWarp rows of W; x is staged per K
//                    chunk in shared memory (as fp32) and shared by the block's
//                    warps; the rank-R expand u B^T and the bias are added by the
//                    first K split. With k_split > 1 partial sums go to an fp32
//                    buffer with atomics and lora_cast writes y.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "fusedlora.h"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kChunk = 512;  // K elements of x staged in shared memory per step
constexpr int kShrinkChunk = 2048;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Loads kVec consecutive elements of a row as floats: one 16-byte load when
// the row is aligned (kVec * sizeof(T) == 16), else element by element.
template <typename T, int kVec, bool kAligned>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec]) {
  if constexpr (kAligned) {
    union { int4 raw; T elems[kVec]; } v;
    v.raw = __ldg(reinterpret_cast<const int4*>(p));
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(v.elems[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(p[i]);
  }
}

// Row m's adapter: first pooled row, rank and scale; rank 0 for a base-only row.
struct Slot {
  int off, rank;
  float scale;
};

__device__ __forceinline__ Slot slot_of(int m, int R, float scaling, const int* row_slot, const int* slot_off,
                                        const int* slot_rank, const float* slot_scale) {
  if (row_slot == nullptr) return {0, R, scaling};
  const int s = row_slot[m];
  if (s < 0) return {0, 0, 0.f};
  return {slot_off[s], slot_rank[s], slot_scale[s]};
}

// u[m, j] += scale_m * sum_{k in this block's slice} x[m, k] A[off_m + j, k] for
// j < rank_m; grid (R, K slices).
template <typename T, int kRows>
__global__ void lora_shrink(const T* __restrict__ x, const T* __restrict__ a, float* __restrict__ u,
                            int M, int K, int R, int64_t ld_x, int64_t ld_a, float scaling,
                            const int* __restrict__ row_slot, const int* __restrict__ slot_off,
                            const int* __restrict__ slot_rank, const float* __restrict__ slot_scale) {
  const int j = blockIdx.x;
  const int k_begin = blockIdx.y * kShrinkChunk;
  const int k_end = min(K, k_begin + kShrinkChunk);
  const T* a_row[kRows];
  float scale[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    const Slot sl = m < M ? slot_of(m, R, scaling, row_slot, slot_off, slot_rank, slot_scale) : Slot{0, 0, 0.f};
    a_row[m] = j < sl.rank ? a + (sl.off + j) * ld_a : nullptr;
    scale[m] = sl.scale;
  }
  float acc[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = 0.f;
  for (int k = k_begin + threadIdx.x; k < k_end; k += blockDim.x) {
#pragma unroll
    for (int m = 0; m < kRows; ++m)
      if (a_row[m] != nullptr) acc[m] += to_float(a_row[m][k]) * to_float(x[m * ld_x + k]);
  }
  __shared__ float partial[kRows][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0) partial[m][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < kRows && threadIdx.x < M) {
    const int m = threadIdx.x;
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += partial[m][w];
#pragma unroll
    for (int i = 0; i < kRows; ++i)  // registers are indexed statically
      if (i == m && a_row[i] != nullptr) atomicAdd(&u[m * R + j], scale[i] * s);
  }
}

// Output (m, n) of a GEMV whose K split holds the partial dot product acc: the first
// split adds the bias, the rank-r expand u B^T (the scale is already in u) and the
// sparse row's few nonzeros against x (in L2); one split writes y, several add into
// the fp32 buffer that lora_cast rounds.
template <typename T>
__device__ __forceinline__ void finish_output(int m, int n, float acc, const T* __restrict__ x,
                                              const T* __restrict__ bias, const T* __restrict__ b,
                                              const float* __restrict__ u, T* __restrict__ y,
                                              float* __restrict__ partial, int N, int R, int64_t ld_x,
                                              int64_t stride_bn, int64_t stride_bj, const int* __restrict__ row_slot,
                                              const int* __restrict__ slot_off, const int* __restrict__ slot_rank,
                                              const WeightDelta& delta) {
  if (blockIdx.y == 0) {
    if (bias != nullptr) acc += to_float(bias[n]);
    int off = 0, rank = R;
    if (row_slot != nullptr) {
      const int s = row_slot[m];
      off = s < 0 ? 0 : slot_off[s];
      rank = s < 0 ? 0 : slot_rank[s];
    }
    if (rank > 0) {
      const T* b_row = b + n * stride_bn + off * stride_bj;
      for (int j = 0; j < rank; ++j) acc += u[m * R + j] * to_float(b_row[j * stride_bj]);
    }
    if (delta.sp_row_ptr != nullptr) {
      for (int i = delta.sp_row_ptr[n]; i < delta.sp_row_ptr[n + 1]; ++i)
        acc += delta.sp_scale * delta.sp_val[i] * to_float(x[m * ld_x + delta.sp_col[i]]);
    }
  }
  if (gridDim.y == 1) {
    y[static_cast<int64_t>(m) * N + n] = from_float<T>(acc);
  } else {
    atomicAdd(&partial[static_cast<int64_t>(m) * N + n], acc);
  }
}

// The C3A delta of W[n, col] (block-circulant, gathered from the small kernel).
__device__ __forceinline__ float c3a_delta(const WeightDelta& d, int n, int col) {
  const int nb = n / d.c3a_block, cb = col / d.c3a_block;
  int off = (col - cb * d.c3a_block) - (n - nb * d.c3a_block);
  off += off < 0 ? d.c3a_block : 0;
  return d.c3a[nb * d.c3a_s0 + cb * d.c3a_s1 + off * d.c3a_s2] * d.c3a_scale;
}

// CUDA-core GEMV, every dtype and C3A. One block: kRowsPerBlock rows of W over one K
// split; grid (ceil(N / rows), k_split).
template <typename T, int kRows, bool kAligned, bool kC3A>
__global__ void __launch_bounds__(kWarps * 32)
lora_gemv(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
          const T* __restrict__ b, const float* __restrict__ u, T* __restrict__ y, float* __restrict__ partial,
          int M, int N, int K, int R, int64_t ld_x, int64_t ld_w, int64_t stride_bn, int64_t stride_bj,
          int k_per_split, const int* __restrict__ row_slot, const int* __restrict__ slot_off,
          const int* __restrict__ slot_rank, const WeightDelta delta) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ __align__(16) float xs[kRows][kChunk];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  const int k_lo = blockIdx.y * k_per_split;
  const int k_hi = min(K, k_lo + k_per_split);

  float acc[kRowsPerWarp][kRows];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[r][m] = 0.f;

  for (int k0 = k_lo; k0 < k_hi; k0 += kChunk) {
    const int len = min(kChunk, k_hi - k0);
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * kChunk; i += blockDim.x) {
      const int m = i / kChunk, k = i % kChunk;
      xs[m][k] = (m < M && k < len) ? to_float(x[m * ld_x + k0 + k]) : 0.f;
    }
    __syncthreads();
    // Full vectors, then the ragged tail element by element.
    const int full = len / kVec * kVec;
    for (int k = lane * kVec; k < full; k += 32 * kVec) {
      float wv[kRowsPerWarp][kVec];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int n = min(row0 + r, N - 1);  // clamped rows are computed and discarded
        load_vec<T, kVec, kAligned>(w + n * ld_w + k0 + k, wv[r]);
        if constexpr (kC3A) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) wv[r][i] += c3a_delta(delta, n, k0 + k + i);
        }
      }
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        // x as float4s: 16-byte shared loads keep bank conflicts to 2-way.
        float xv[kVec];
#pragma unroll
        for (int i = 0; i < kVec; i += 4) {
          const float4 q = *reinterpret_cast<const float4*>(&xs[m][k + i]);
          xv[i] = q.x; xv[i + 1] = q.y; xv[i + 2] = q.z; xv[i + 3] = q.w;
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i)
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][m] += wv[r][i] * xv[i];
      }
    }
    for (int k = full + lane; k < len; k += 32) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int n = min(row0 + r, N - 1);
        float wv = to_float(w[n * ld_w + k0 + k]);
        if constexpr (kC3A) wv += c3a_delta(delta, n, k0 + k);
#pragma unroll
        for (int m = 0; m < kRows; ++m) acc[r][m] += wv * xs[m][k];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int n = row0 + r;
    float mine = 0.f;  // lane m keeps row m's total
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == m) mine = s;
    }
    if (n >= N || lane >= M) continue;
    finish_output(lane, n, mine, x, bias, b, u, y, partial, N, R, ld_x, stride_bn, stride_bj, row_slot, slot_off,
                  slot_rank, delta);
  }
}

// ------------------------------------------------------------------ tensor-core GEMV
// fp16/bf16 without C3A, rows of W and x 16-byte aligned (the binding checks). Each
// warp runs mma.m16n8k16 with W's 16 rows of the block as the A operand and up to 16
// rows of x as B (two n8 tiles from 9 rows up): per K chunk of 32 a lane loads one
// 16-byte vector of each of its two W rows and of its x rows, so every load is a
// full vector and a warp keeps kMmaUnroll chunks (2 x 16 B of W per lane each) in
// flight. At 16 rows the FMA GEMV spends 128 FMAs per vector of W (docs/cuda.md);
// here one mma covers 16 x 8 x 16.
//
// The reduction order inside a chunk is free as long as both operands agree, so a
// lane's vector of 8 consecutive k (at tig * 8) feeds the fragment slots the PTX
// layout gives it: lane (g = lane / 4, tig = lane % 4) holds A (row g, g + 8; k pairs
// 2 tig and 8 + 2 tig) and B (column g; the same k pairs). The first mma takes the
// vector's elements 0..3 as those two pairs, the second elements 4..7: together the
// four lanes of a group cover the chunk's 32 k exactly once.
constexpr int kMmaWarps = 8;   // warps of a block, splitting its K range chunk by chunk
constexpr int kMmaRows = 16;   // rows of W per block: the mma's M
constexpr int kMmaUnroll = 4;  // K chunks of 32 in flight per warp

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

// Elements k .. k+7 of a row (16-byte aligned at k), zeros at and past k_end; a null
// row (past x's rows) is zeros.
template <typename T>
__device__ __forceinline__ uint4 load8(const T* row, int k, int k_end) {
  if (row == nullptr || k >= k_end) return make_uint4(0u, 0u, 0u, 0u);
  if (k + 8 <= k_end) return __ldg(reinterpret_cast<const uint4*>(row + k));
  union { uint4 raw; T elems[8]; } v;
  v.raw = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < 8; ++i)  // constant indices: the union stays in registers
    if (k + i < k_end) v.elems[i] = row[k + i];
  return v.raw;
}

// grid (ceil(N / kMmaRows), k_split); kTiles n8 tiles of x rows (1: M <= 8, 2: M <= 16).
template <typename T, int kTiles>
__global__ void __launch_bounds__(kMmaWarps * 32)
lora_gemv_mma(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ b,
              const float* __restrict__ u, T* __restrict__ y, float* __restrict__ partial, int M, int N, int K, int R,
              int64_t ld_x, int64_t ld_w, int64_t stride_bn, int64_t stride_bj, int k_per_split,
              const int* __restrict__ row_slot, const int* __restrict__ slot_off, const int* __restrict__ slot_rank,
              const WeightDelta delta) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tig = lane % 4;
  const int n0 = blockIdx.x * kMmaRows;
  const int k_lo = blockIdx.y * k_per_split;
  const int k_hi = min(K, k_lo + k_per_split);
  // rows past N are clamped: computed and discarded
  const T* w_lo = w + static_cast<int64_t>(min(n0 + g, N - 1)) * ld_w;
  const T* w_hi = w + static_cast<int64_t>(min(n0 + g + 8, N - 1)) * ld_w;
  const T* x_row[kTiles];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) x_row[t] = t * 8 + g < M ? x + (t * 8 + g) * ld_x : nullptr;

  float acc[kTiles][4];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  const int chunks = (k_hi - k_lo + 31) / 32;
  for (int c0 = warp; c0 < chunks; c0 += kMmaWarps * kMmaUnroll) {
    uint4 wl[kMmaUnroll], wh[kMmaUnroll], xv[kMmaUnroll][kTiles];
#pragma unroll
    for (int i = 0; i < kMmaUnroll; ++i) {  // all loads first: they are what the kernel waits on
      const int k = k_lo + (c0 + i * kMmaWarps) * 32 + tig * 8;
      wl[i] = load8(w_lo, k, k_hi);
      wh[i] = load8(w_hi, k, k_hi);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) xv[i][t] = load8(x_row[t], k, k_hi);
    }
#pragma unroll
    for (int i = 0; i < kMmaUnroll; ++i) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_m16n8k16<T>(acc[t], wl[i].x, wh[i].x, wl[i].y, wh[i].y, xv[i][t].x, xv[i][t].y);
        mma_m16n8k16<T>(acc[t], wl[i].z, wh[i].z, wl[i].w, wh[i].w, xv[i][t].z, xv[i][t].w);
      }
    }
  }

  // D fragment: acc[t][0..3] = (W row g, x row 2 tig), (g, 2 tig + 1), (g + 8, 2 tig), (g + 8, 2 tig + 1)
  // of tile t; the block's warps each hold a part of the K range: summed through shared memory.
  __shared__ float red[kMmaWarps][kTiles * 8][kMmaRows + 1];
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    red[warp][t * 8 + 2 * tig][g] = acc[t][0];
    red[warp][t * 8 + 2 * tig + 1][g] = acc[t][1];
    red[warp][t * 8 + 2 * tig][g + 8] = acc[t][2];
    red[warp][t * 8 + 2 * tig + 1][g + 8] = acc[t][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTiles * 8 * kMmaRows; i += blockDim.x) {
    const int m = i / kMmaRows, f = i % kMmaRows, n = n0 + f;  // consecutive threads: consecutive n
    if (m >= M || n >= N) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kMmaWarps; ++v) sum += red[v][m][f];
    finish_output(m, n, sum, x, bias, b, u, y, partial, N, R, ld_x, stride_bn, stride_bj, row_slot, slot_off,
                  slot_rank, delta);
  }
}

template <typename T>
__global__ void lora_cast(const float* __restrict__ partial, T* __restrict__ y, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) y[i] = from_float<T>(partial[i]);
}

template <typename T, int kRows>
cudaError_t launch_rows(const LoraDecodeArgs& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);

  if (p.gemv == Gemv::kMma && (std::is_same<T, float>::value || !mma_serves(p)))
    return cudaErrorInvalidValue;  // the binding checks first: never reached
  if (p.R > 0) {
    dim3 shrink_grid(p.R, (p.K + kShrinkChunk - 1) / kShrinkChunk);
    lora_shrink<T, kRows><<<shrink_grid, 256, 0, p.stream>>>(x, a, p.u, p.M, p.K, p.R, p.ld_x, p.ld_a, p.scaling,
                                                             p.row_slot, p.slot_off, p.slot_rank, p.slot_scale);
  }

  const int splits = p.k_split < 1 ? 1 : p.k_split;
  // Splits cut K at multiples of the chunk so vector loads stay aligned.
  const int chunks = (p.K + kChunk - 1) / kChunk;
  const int k_per_split = ((chunks + splits - 1) / splits) * kChunk;
  const int k_blocks = (p.K + k_per_split - 1) / k_per_split;
  if constexpr (!std::is_same<T, float>::value) {
    if (p.gemv == Gemv::kMma) {
      dim3 grid((p.N + kMmaRows - 1) / kMmaRows, k_blocks);
#define FUSEDLORA_GEMV_MMA(TILES)                                                                                  \
  lora_gemv_mma<T, TILES><<<grid, kMmaWarps * 32, 0, p.stream>>>(                                                  \
      x, w, bias, b, p.u, y, p.partial, p.M, p.N, p.K, p.R, p.ld_x, p.ld_w, p.stride_bn, p.stride_bj, k_per_split, \
      p.row_slot, p.slot_off, p.slot_rank, p.delta)
      if (kRows <= 8) FUSEDLORA_GEMV_MMA(1);
      else FUSEDLORA_GEMV_MMA(2);
#undef FUSEDLORA_GEMV_MMA
      if (k_blocks > 1) {
        const int64_t count = static_cast<int64_t>(p.M) * p.N;
        lora_cast<T><<<static_cast<unsigned>((count + 255) / 256), 256, 0, p.stream>>>(p.partial, y, count);
      }
      return cudaGetLastError();
    }
  }
  dim3 grid((p.N + kRowsPerBlock - 1) / kRowsPerBlock, k_blocks);
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0 && (p.ld_w * sizeof(T)) % 16 == 0;
  const bool c3a = p.delta.c3a != nullptr;
#define FUSEDLORA_GEMV(ALIGNED, C3A)                                                                             \
  lora_gemv<T, kRows, ALIGNED, C3A><<<grid, kWarps * 32, 0, p.stream>>>(                                         \
      x, w, bias, b, p.u, y, p.partial, p.M, p.N, p.K, p.R, p.ld_x, p.ld_w, p.stride_bn, p.stride_bj, k_per_split, \
      p.row_slot, p.slot_off, p.slot_rank, p.delta)
  if (aligned && c3a) FUSEDLORA_GEMV(true, true);
  else if (aligned) FUSEDLORA_GEMV(true, false);
  else if (c3a) FUSEDLORA_GEMV(false, true);
  else FUSEDLORA_GEMV(false, false);
#undef FUSEDLORA_GEMV
  static_assert(kChunk % (16 / sizeof(float)) == 0 && kChunk % kVec == 0, "chunk must hold whole vectors");
  if (grid.y > 1) {
    const int64_t count = static_cast<int64_t>(p.M) * p.N;
    lora_cast<T><<<static_cast<unsigned>((count + 255) / 256), 256, 0, p.stream>>>(p.partial, y, count);
  }
  return cudaGetLastError();
}

// Register use grows with the row count: round M up to a power of two.
template <typename T>
cudaError_t launch_dtype(const LoraDecodeArgs& p) {
  if (p.M <= 1) return launch_rows<T, 1>(p);
  if (p.M <= 2) return launch_rows<T, 2>(p);
  if (p.M <= 4) return launch_rows<T, 4>(p);
  if (p.M <= 8) return launch_rows<T, 8>(p);
  return launch_rows<T, 16>(p);
}

}  // namespace

bool mma_serves(const LoraDecodeArgs& p) {
  const auto aligned = [](const void* ptr, int64_t ld) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % 8 == 0;  // 16-bit elements: rows of 16 B
  };
  // The device's capability is not enough: a build for an older arch (say 7.5+PTX, JIT-
  // compiled here) has the kernel's __trap() body. Ask what the kernel was compiled as.
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, lora_gemv_mma<__nv_bfloat16, 1>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not left for the launch's error check
  const bool built = err == cudaSuccess && attr.ptxVersion >= 80;
  return built && p.dtype != DType::kFloat32 && p.delta.c3a == nullptr && p.sm_major >= 8 &&
         aligned(p.w, p.ld_w) && aligned(p.x, p.ld_x);
}

int lora_decode_k_split(const LoraDecodeArgs& p, int num_sms) {
  const int chunks = (p.K + kChunk - 1) / kChunk;
  int want;
  if (p.gemv == Gemv::kMma) {
    // a block is 8 warps with 4 chunks of 2 x 16 B in flight each: one block per SM
    // already covers HBM's latency, so split only when W's rows give fewer blocks
    const int blocks = (p.N + kMmaRows - 1) / kMmaRows;
    want = (num_sms + blocks - 1) / blocks;
  } else {
    const int blocks = (p.N + kRowsPerBlock - 1) / kRowsPerBlock;
    want = (2 * num_sms + blocks - 1) / blocks;
  }
  return want < 1 ? 1 : (want > chunks ? chunks : want);
}

cudaError_t lora_decode_forward(const LoraDecodeArgs& p) {
  if (p.M < 1 || p.M > kMaxDecodeRows || p.N < 1 || p.K < 1 || p.R < 0) return cudaErrorInvalidValue;
  if (p.row_slot != nullptr && (p.slot_off == nullptr || p.slot_rank == nullptr || p.slot_scale == nullptr))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dtype<float>(p);
    case DType::kFloat16: return launch_dtype<__half>(p);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedlora
