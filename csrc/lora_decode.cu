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

// One block: kRowsPerBlock rows of W over one K split; grid (ceil(N / rows), k_split).
// The C3A delta of W[n, col] (block-circulant, gathered from the small kernel).
__device__ __forceinline__ float c3a_delta(const WeightDelta& d, int n, int col) {
  const int nb = n / d.c3a_block, cb = col / d.c3a_block;
  int off = (col - cb * d.c3a_block) - (n - nb * d.c3a_block);
  off += off < 0 ? d.c3a_block : 0;
  return d.c3a[nb * d.c3a_s0 + cb * d.c3a_s1 + off * d.c3a_s2] * d.c3a_scale;
}

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
    if (blockIdx.y == 0) {
      if (bias != nullptr) mine += to_float(bias[n]);
      int off = 0, rank = R;  // the scale is already in u
      if (row_slot != nullptr) {
        const int s = row_slot[lane];
        off = s < 0 ? 0 : slot_off[s];
        rank = s < 0 ? 0 : slot_rank[s];
      }
      if (rank > 0) {
        const T* b_row = b + n * stride_bn + off * stride_bj;
        for (int j = 0; j < rank; ++j) mine += u[lane * R + j] * to_float(b_row[j * stride_bj]);
      }
      if (delta.sp_row_ptr != nullptr) {  // this row's few nonzeros against x in L2
        for (int i = delta.sp_row_ptr[n]; i < delta.sp_row_ptr[n + 1]; ++i)
          mine += delta.sp_scale * delta.sp_val[i] * to_float(x[lane * ld_x + delta.sp_col[i]]);
      }
    }
    if (gridDim.y == 1) {
      y[static_cast<int64_t>(lane) * N + n] = from_float<T>(mine);
    } else {
      atomicAdd(&partial[static_cast<int64_t>(lane) * N + n], mine);
    }
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

  if (p.R > 0) {
    dim3 shrink_grid(p.R, (p.K + kShrinkChunk - 1) / kShrinkChunk);
    lora_shrink<T, kRows><<<shrink_grid, 256, 0, p.stream>>>(x, a, p.u, p.M, p.K, p.R, p.ld_x, p.ld_a, p.scaling,
                                                             p.row_slot, p.slot_off, p.slot_rank, p.slot_scale);
  }

  const int splits = p.k_split < 1 ? 1 : p.k_split;
  // Splits cut K at multiples of the chunk so vector loads stay aligned.
  const int chunks = (p.K + kChunk - 1) / kChunk;
  const int k_per_split = ((chunks + splits - 1) / splits) * kChunk;
  dim3 grid((p.N + kRowsPerBlock - 1) / kRowsPerBlock, (p.K + k_per_split - 1) / k_per_split);
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

int lora_decode_k_split(int N, int K, int num_sms) {
  const int blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int chunks = (K + kChunk - 1) / kChunk;
  const int want = (2 * num_sms + blocks - 1) / blocks;
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
