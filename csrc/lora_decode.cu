// Fused LoRA decode (M <= 16 rows): y = x W^T + b + (s x A^T) B^T, with one
// adapter for all rows or one per row (BGMV: pooled adapters of any ranks).
//
// At decode time the layer is a matrix-vector problem bound by HBM
// bandwidth: the goal is to stream W exactly once with wide loads and hide
// the adapter behind it. In a CUDA graph every dependent launch (and every
// memset) adds a few microseconds at 1 row, so a call is two launches and no
// memset:
//   lora_gemv[_mma]  the first R blocks compute the shrink u = s x A^T (one
//                    rank index each over all of K, plain stores: nothing to
//                    zero); the rest stream W, each (row tile, K split)
//                    storing its partial sums of x W^T into its own slice of
//                    an fp32 buffer (plain stores again). The shrink runs beside
//                    the GEMV instead of before it.
//   lora_finish      y = the splits' partials + bias + u B^T + the sparse rows,
//                    summed in a fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "fusedlora.h"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;  // both GEMVs' blocks, shrink blocks included
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kChunk = 512;  // K elements of x staged in shared memory per step

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

// Element i of a float32/float16/bfloat16 vector whose dtype is only known at run time.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
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

// How a call is cut into blocks (lora_decode_forward fills it).
struct Plan {
  int shrink_blocks;  // R: blocks 0 .. R-1 of the GEMV's grid run the shrink
  int k_blocks;       // K splits of W's reduction
  int k_per_split;    // K elements per split (a multiple of kChunk)
  bool shrink_vec;    // x and A rows 16-byte aligned: the shrink loads vectors
};

// Row m's adapter: first pooled row, rank and scale; rank 0 for a base-only row.
struct Slot {
  int off, rank;
  float scale;
};

__device__ __forceinline__ Slot slot_of(int m, const LoraDecodeArgs& p) {
  if (p.row_slot == nullptr) return {0, p.R, p.scaling};
  const int s = p.row_slot[m];
  // The op is callable with unchecked tables (torch.ops.fusedlora.*, validate=False): a
  // slot past the tables serves the base only, and a slot's rows are clipped to the pool,
  // so no value of them reads outside the tables or the pool.
  if (s < 0 || s >= p.num_slots) return {0, 0, 0.f};
  const int off = p.slot_off[s];
  const int rank = p.slot_rank[s];
  if (off < 0 || rank <= 0 || off >= p.pool_rows) return {0, 0, 0.f};
  return {off, min(rank, p.pool_rows - off), p.slot_scale[s]};
}

// The shrink's block j: u[m, j] = scale_m * x[m] . A[off_m + j] over all of K for every
// row m (0 where j >= rank_m). Warp w takes one or two rows over a 1/kParts share of K
// (rows past M do nothing): a thread holding all 16 rows' accumulators and A pointers
// would put ~90 registers on the 16-row GEMV that shares this kernel (219 against 128:
// one block per SM instead of two).
template <typename T, int kRows>
__device__ __forceinline__ void shrink_block(int j, const LoraDecodeArgs& p, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kParts = kRows >= kWarps ? 1 : kWarps / kRows;  // warps sharing one row's K
  constexpr int kRowGroups = kWarps / kParts;                    // min(kRows, kWarps)
  constexpr int kWarpRows = kRows / kRowGroups;                  // rows per warp: 1, or 2 at 16
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int part = warp % kParts, group = warp / kParts;
  const T* a_row[kWarpRows];
  const T* x_row[kWarpRows];
  float acc[kWarpRows];
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const int m = group + i * kRowGroups;
    const Slot sl = m < p.M ? slot_of(m, p) : Slot{0, 0, 0.f};
    a_row[i] = j < sl.rank ? a + static_cast<int64_t>(sl.off + j) * p.ld_a : nullptr;
    x_row[i] = x + static_cast<int64_t>(m) * p.ld_x;
    acc[i] = 0.f;
  }
  const int full = vec ? p.K / kVec * kVec : 0;
  for (int k = (part * 32 + lane) * kVec; k < full; k += kParts * 32 * kVec) {
#pragma unroll
    for (int i = 0; i < kWarpRows; ++i) {
      if (a_row[i] == nullptr) continue;
      float av[kVec], xv[kVec];
      load_vec<T, kVec, true>(a_row[i] + k, av);
      load_vec<T, kVec, true>(x_row[i] + k, xv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[i] += av[e] * xv[e];
    }
  }
  for (int k = full + part * 32 + lane; k < p.K; k += kParts * 32) {
#pragma unroll
    for (int i = 0; i < kWarpRows; ++i)
      if (a_row[i] != nullptr) acc[i] += to_float(a_row[i][k]) * to_float(x_row[i][k]);
  }
  __shared__ float sums[kRows][kParts];  // every (row, part) is written: rows past M as 0
#pragma unroll
  for (int i = 0; i < kWarpRows; ++i) {
    const float s = warp_sum(acc[i]);
    if (lane == 0) sums[group + i * kRowGroups][part] = s;
  }
  __syncthreads();
  if (threadIdx.x < kRows && threadIdx.x < p.M) {
    const int m = threadIdx.x;
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kParts; ++q) s += sums[m][q];
    const Slot sl = slot_of(m, p);
    p.u[static_cast<int64_t>(m) * p.R + j] = j < sl.rank ? sl.scale * s : 0.f;
  }
}

// The C3A delta of W[n, col] (block-circulant, gathered from the small kernel).
__device__ __forceinline__ float c3a_delta(const WeightDelta& d, int n, int col) {
  const int nb = n / d.c3a_block, cb = col / d.c3a_block;
  int off = (col - cb * d.c3a_block) - (n - nb * d.c3a_block);
  off += off < 0 ? d.c3a_block : 0;
  return d.c3a[nb * d.c3a_s0 + cb * d.c3a_s1 + off * d.c3a_s2] * d.c3a_scale;
}

// Where split `split` of the GEMV leaves output (m, n)'s partial sum.
__device__ __forceinline__ float* partial_at(const LoraDecodeArgs& p, int split, int m, int n) {
  return p.partial + (static_cast<int64_t>(split) * p.M + m) * p.N + n;
}

// CUDA-core GEMV, every dtype and C3A. Past the shrink's blocks, block t holds
// kRowsPerBlock rows of W (tile t / k_blocks) over one K split (t % k_blocks).
template <typename T, int kRows, bool kAligned, bool kC3A>
__global__ void __launch_bounds__(kThreads, kAligned && !kC3A ? 2 : 0) lora_gemv(const LoraDecodeArgs p, const Plan plan) {
  if (static_cast<int>(blockIdx.x) < plan.shrink_blocks) {
    shrink_block<T, kRows>(blockIdx.x, p, plan.shrink_vec);
    return;
  }
  constexpr int kVec = 16 / sizeof(T);
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  __shared__ __align__(16) float xs[kRows][kChunk];
  const int t = blockIdx.x - plan.shrink_blocks;
  const int tile = t / plan.k_blocks, split = t % plan.k_blocks;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = tile * kRowsPerBlock + warp * kRowsPerWarp;
  const int k_lo = split * plan.k_per_split;
  const int k_hi = min(p.K, k_lo + plan.k_per_split);

  float acc[kRowsPerWarp][kRows];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[r][m] = 0.f;

  for (int k0 = k_lo; k0 < k_hi; k0 += kChunk) {
    const int len = min(kChunk, k_hi - k0);
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * kChunk; i += kThreads) {
      const int m = i / kChunk, k = i % kChunk;
      xs[m][k] = (m < p.M && k < len) ? to_float(x[m * p.ld_x + k0 + k]) : 0.f;
    }
    __syncthreads();
    // Full vectors, then the ragged tail element by element. A chunk is two steps of the
    // warp's 32 vectors per row: unrolled for few rows so both steps' loads of W are in
    // flight together (8 per lane instead of 4); at 8-16 rows the registers are not there.
    const int full = len / kVec * kVec;
    constexpr int kUnroll = kRows <= 4 ? 2 : 1;
#pragma unroll kUnroll
    for (int k = lane * kVec; k < full; k += 32 * kVec) {
      float wv[kRowsPerWarp][kVec];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int n = min(row0 + r, p.N - 1);  // clamped rows are computed and discarded
        load_vec<T, kVec, kAligned>(w + n * p.ld_w + k0 + k, wv[r]);
        if constexpr (kC3A) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) wv[r][i] += c3a_delta(p.delta, n, k0 + k + i);
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
        const int n = min(row0 + r, p.N - 1);
        float wv = to_float(w[n * p.ld_w + k0 + k]);
        if constexpr (kC3A) wv += c3a_delta(p.delta, n, k0 + k);
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
    if (n < p.N && lane < p.M) *partial_at(p, split, lane, n) = mine;
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
constexpr int kMmaWarps = kWarps;  // warps of a block, splitting its K range chunk by chunk
constexpr int kMmaRows = 16;       // rows of W per block: the mma's M
constexpr int kMmaUnroll = 4;      // K chunks of 32 in flight per warp

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

// Past the shrink's blocks, block t holds kMmaRows rows of W (tile t / k_blocks) over
// one K split; kTiles n8 tiles of x rows (1: M <= 8, 2: M <= 16).
template <typename T, int kRows, int kTiles>
__global__ void __launch_bounds__(kThreads) lora_gemv_mma(const LoraDecodeArgs p, const Plan plan) {
  if (static_cast<int>(blockIdx.x) < plan.shrink_blocks) {
    shrink_block<T, kRows>(blockIdx.x, p, plan.shrink_vec);
    return;
  }
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const int t = blockIdx.x - plan.shrink_blocks;
  const int tile = t / plan.k_blocks, split = t % plan.k_blocks;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, tig = lane % 4;
  const int n0 = tile * kMmaRows;
  const int k_lo = split * plan.k_per_split;
  const int k_hi = min(p.K, k_lo + plan.k_per_split);
  // rows past N are clamped: computed and discarded
  const T* w_lo = w + static_cast<int64_t>(min(n0 + g, p.N - 1)) * p.ld_w;
  const T* w_hi = w + static_cast<int64_t>(min(n0 + g + 8, p.N - 1)) * p.ld_w;
  const T* x_row[kTiles];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) x_row[i] = i * 8 + g < p.M ? x + (i * 8 + g) * p.ld_x : nullptr;

  float acc[kTiles][4];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int chunks = (k_hi - k_lo + 31) / 32;
  for (int c0 = warp; c0 < chunks; c0 += kMmaWarps * kMmaUnroll) {
    uint4 wl[kMmaUnroll], wh[kMmaUnroll], xv[kMmaUnroll][kTiles];
#pragma unroll
    for (int i = 0; i < kMmaUnroll; ++i) {  // all loads first: they are what the kernel waits on
      const int k = k_lo + (c0 + i * kMmaWarps) * 32 + tig * 8;
      wl[i] = load8(w_lo, k, k_hi);
      wh[i] = load8(w_hi, k, k_hi);
#pragma unroll
      for (int j = 0; j < kTiles; ++j) xv[i][j] = load8(x_row[j], k, k_hi);
    }
#pragma unroll
    for (int i = 0; i < kMmaUnroll; ++i) {
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        mma_m16n8k16<T>(acc[j], wl[i].x, wh[i].x, wl[i].y, wh[i].y, xv[i][j].x, xv[i][j].y);
        mma_m16n8k16<T>(acc[j], wl[i].z, wh[i].z, wl[i].w, wh[i].w, xv[i][j].z, xv[i][j].w);
      }
    }
  }

  // D fragment: acc[i][0..3] = (W row g, x row 2 tig), (g, 2 tig + 1), (g + 8, 2 tig), (g + 8, 2 tig + 1)
  // of tile i; the block's warps each hold a part of the K range: summed through shared memory.
  __shared__ float red[kMmaWarps][kTiles * 8][kMmaRows + 1];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    red[warp][i * 8 + 2 * tig][g] = acc[i][0];
    red[warp][i * 8 + 2 * tig + 1][g] = acc[i][1];
    red[warp][i * 8 + 2 * tig][g + 8] = acc[i][2];
    red[warp][i * 8 + 2 * tig + 1][g + 8] = acc[i][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTiles * 8 * kMmaRows; i += kThreads) {
    const int m = i / kMmaRows, f = i % kMmaRows, n = n0 + f;  // consecutive threads: consecutive n
    if (m >= p.M || n >= p.N) continue;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kMmaWarps; ++v) sum += red[v][m][f];
    *partial_at(p, split, m, n) = sum;
  }
}

// y[m, n] = the K splits' partials (in split order) + bias + the rank-r expand u B^T
// (the scale is already in u) + the sparse row's few nonzeros against x (in L2).
// One thread per output, consecutive threads along n.
template <typename T>
__global__ void lora_finish(const LoraDecodeArgs p, int k_blocks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(p.M) * p.N) return;
  const int m = static_cast<int>(i / p.N), n = static_cast<int>(i % p.N);
  const T* x = static_cast<const T*>(p.x);
  float acc = 0.f;
  for (int s = 0; s < k_blocks; ++s) acc += *partial_at(p, s, m, n);
  if (p.bias != nullptr) acc += to_float(static_cast<const T*>(p.bias)[n]);
  const Slot sl = p.R > 0 ? slot_of(m, p) : Slot{0, 0, 0.f};
  // A slot's rank above R (a caller's max_rank, unchecked under validate=False) would
  // read u past row m: only the R columns the shrink wrote count.
  const int rank = min(sl.rank, p.R);
  if (rank > 0) {
    const T* b_row = static_cast<const T*>(p.b) + n * p.stride_bn + static_cast<int64_t>(sl.off) * p.stride_bj;
    const float* u_row = p.u + static_cast<int64_t>(m) * p.R;
    for (int j = 0; j < rank; ++j) acc += u_row[j] * to_float(b_row[j * p.stride_bj]);
  }
  const WeightDelta& d = p.delta;
  if (d.sp_row_ptr != nullptr) {
    for (int e = d.sp_row_ptr[n]; e < d.sp_row_ptr[n + 1]; ++e)
      acc += d.sp_scale * load_as_float(d.sp_val, d.sp_val_dtype, d.sp_order[e]) *
             to_float(x[m * p.ld_x + d.sp_col[e]]);
  }
  static_cast<T*>(p.y)[i] = from_float<T>(acc);
}

template <typename T, int kRows>
cudaError_t launch_rows(const LoraDecodeArgs& p) {
  if (p.gemv == Gemv::kMma && (std::is_same<T, float>::value || !mma_serves(p)))
    return cudaErrorInvalidValue;  // the binding checks first: never reached
  constexpr int kVec = 16 / sizeof(T);
  const auto vec_rows = [](const void* ptr, int64_t ld) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % kVec == 0;
  };
  const int splits = p.k_split < 1 ? 1 : p.k_split;
  // Splits cut K at multiples of the chunk so vector loads stay aligned.
  // in 64 bits: K + a split's length passes 2^31 for K near it (the binding caps K at 2^30)
  const int64_t chunks = (static_cast<int64_t>(p.K) + kChunk - 1) / kChunk;
  const int64_t k_per_split = (chunks + splits - 1) / splits * kChunk;
  Plan plan;
  plan.shrink_blocks = p.R;
  plan.k_per_split = static_cast<int>(k_per_split);
  plan.k_blocks = static_cast<int>((p.K + k_per_split - 1) / k_per_split);
  plan.shrink_vec = p.R > 0 && vec_rows(p.x, p.ld_x) && vec_rows(p.a, p.ld_a);
  const bool mma = p.gemv == Gemv::kMma;
  const int rows_per_block = mma ? kMmaRows : kRowsPerBlock;
  const int64_t blocks = (static_cast<int64_t>(p.N) + rows_per_block - 1) / rows_per_block * plan.k_blocks + p.R;
  if (blocks >= (1LL << 31)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if constexpr (!std::is_same<T, float>::value) {
    if (mma) {
      lora_gemv_mma<T, kRows, kRows <= 8 ? 1 : 2><<<grid, kThreads, 0, p.stream>>>(p, plan);
    }
  }
  if (!mma) {
    const bool aligned = vec_rows(p.w, p.ld_w);
    const bool c3a = p.delta.c3a != nullptr;
    if (aligned && c3a) lora_gemv<T, kRows, true, true><<<grid, kThreads, 0, p.stream>>>(p, plan);
    else if (aligned) lora_gemv<T, kRows, true, false><<<grid, kThreads, 0, p.stream>>>(p, plan);
    else if (c3a) lora_gemv<T, kRows, false, true><<<grid, kThreads, 0, p.stream>>>(p, plan);
    else lora_gemv<T, kRows, false, false><<<grid, kThreads, 0, p.stream>>>(p, plan);
  }
  static_assert(kChunk % (16 / sizeof(float)) == 0 && kChunk % kVec == 0, "chunk must hold whole vectors");
  const int64_t outputs = static_cast<int64_t>(p.M) * p.N;
  lora_finish<T><<<static_cast<unsigned>((outputs + 255) / 256), 256, 0, p.stream>>>(p, plan.k_blocks);
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
  const cudaError_t err = cudaFuncGetAttributes(&attr, lora_gemv_mma<__nv_bfloat16, 1, 1>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not left for the launch's error check
  const bool built = err == cudaSuccess && attr.ptxVersion >= 80;
  return built && p.dtype != DType::kFloat32 && p.delta.c3a == nullptr && p.sm_major >= 8 &&
         aligned(p.w, p.ld_w) && aligned(p.x, p.ld_x);
}

int lora_decode_k_split(const LoraDecodeArgs& p, int num_sms) {
  if (p.N < 1 || p.K < 1) return 1;  // nothing to split (lora_decode_forward refuses the shape)
  const int chunks = (p.K + kChunk - 1) / kChunk;
  int want;
  if (p.gemv == Gemv::kMma) {
    // a block is 8 warps with 4 chunks of 2 x 16 B in flight each: one block per SM
    // already covers HBM's latency, so split only when W's rows give fewer blocks
    const int64_t blocks = (static_cast<int64_t>(p.N) + kMmaRows - 1) / kMmaRows;
    want = static_cast<int>((num_sms + blocks - 1) / blocks);
  } else {
    const int64_t blocks = (static_cast<int64_t>(p.N) + kRowsPerBlock - 1) / kRowsPerBlock;
    want = static_cast<int>((2 * num_sms + blocks - 1) / blocks);
  }
  return want < 1 ? 1 : (want > chunks ? chunks : want);
}

cudaError_t lora_decode_forward(const LoraDecodeArgs& p) {
  if (p.M < 1 || p.M > kMaxDecodeRows || p.N < 1 || p.K < 1 || p.R < 0) return cudaErrorInvalidValue;
  if (p.K > kMaxFeatures || p.N > kMaxFeatures) return cudaErrorInvalidValue;
  if (p.row_slot != nullptr && p.num_slots > 0 &&
      (p.slot_off == nullptr || p.slot_rank == nullptr || p.slot_scale == nullptr))
    return cudaErrorInvalidValue;
  if (p.partial == nullptr || (p.R > 0 && (p.u == nullptr || p.a == nullptr || p.b == nullptr)))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dtype<float>(p);
    case DType::kFloat16: return launch_dtype<__half>(p);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedlora
