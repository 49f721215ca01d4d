// Launchers of fusedlora's CUDA kernels. Plain C++ over raw pointers: no torch
// headers here, so the .cu files compile without them (bindings.cpp is the
// only file that includes torch).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fusedlora {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The GEMV that streams W: CUDA-core FMAs (every dtype, C3A), or tensor-core
// mma.m16n8k16 (fp16/bf16 without C3A, rows of W and x 16-byte aligned, sm_80+:
// see mma_serves).
enum class Gemv : int { kFma = 0, kMma = 1 };

// y = x W^T + b + u B^T with u = scaling * x A^T, for M <= 16 rows (decode).
// x, W and A are row-major with unit stride along K and the given leading
// dimensions (in elements); B is addressed as b[n * stride_bn + j * stride_bj].
//
// One adapter (row_slot == nullptr): every row uses A (R x K), B (N x R), scaling.
// Several (BGMV): row m uses slot s = row_slot[m] (-1: base only), whose rows
// slot_off[s] .. + slot_rank[s] - 1 of the pooled A and B and slot_scale[s];
// R is then the largest rank (the width of u). Ranks may differ without padding.
// Weight-side adapters the GEMV applies to W on the fly, in fp32 registers (exact:
// nothing is rounded to 16 bits). Null pointers: not present.
struct WeightDelta {
  // C3A: W[n, k] += c3a[n / b, k / b, (k % b - n % b) mod b] * c3a_scale (= 1 / in_features)
  const float* c3a = nullptr;
  int64_t c3a_s0 = 0, c3a_s1 = 0, c3a_s2 = 0;
  int c3a_block = 1;
  float c3a_scale = 0.f;
  // Sparse delta (SHiRA), rows in CSR: W[n, col[i]] += sp_scale * val[order[i]] for i in
  // row_ptr[n] .. row_ptr[n+1]-1. The values stay in the user's order and dtype (the
  // adapter's parameter itself): no gather or cast per call, so a call stays two launches.
  const int* sp_row_ptr = nullptr;
  const int* sp_col = nullptr;
  const int64_t* sp_order = nullptr;
  const void* sp_val = nullptr;
  DType sp_val_dtype = DType::kFloat32;
  float sp_scale = 0.f;
};

struct LoraDecodeArgs {
  DType dtype;
  const void* x;     // (M, K), ld_x
  const void* w;     // (N, K), ld_w
  const void* bias;  // (N,) or nullptr
  const void* a;     // (R or pool rows, K), ld_a
  const void* b;     // see stride_bn, stride_bj
  void* y;           // (M, N), contiguous
  float* u;          // (M, R) float32, written by the kernels (u = scaling * x A^T)
  float* partial;    // (k_split, M, N) float32 workspace: each K split's partial sums
  int M, N, K, R;
  int64_t ld_x, ld_w, ld_a, stride_bn, stride_bj;
  float scaling;
  const int* row_slot = nullptr;     // (M,) device, or nullptr for one adapter
  const int* slot_off = nullptr;     // (S,) device
  const int* slot_rank = nullptr;    // (S,) device
  const float* slot_scale = nullptr; // (S,) device
  int num_slots = 0;                  // S: a row's slot at or past it serves the base only
  int pool_rows = 0;                  // rows of the pooled A and B: a slot's rows are clipped to them
  WeightDelta delta;                  // C3A / sparse adapters (R = 0 then: no LoRA)
  Gemv gemv = Gemv::kFma;
  int sm_major = 0;  // compute capability of x's device
  int k_split;       // programs sharing W's K range (see lora_decode_k_split)
  cudaStream_t stream;
};

// Whether the tensor-core GEMV can run these arguments (gemv aside).
bool mma_serves(const LoraDecodeArgs& args);

// How many blocks share the reduction so that args.gemv's GEMV fills num_sms SMs.
int lora_decode_k_split(const LoraDecodeArgs& args, int num_sms);

// Largest M the decode kernels take.
constexpr int kMaxDecodeRows = 16;

// Largest K and N: the kernels index features in 32 bits, and a split's end (K plus one
// split's length) must stay below 2^31.
constexpr int kMaxFeatures = 1 << 30;

// Launches the GEMV (the shrink in its first R blocks) and the finishing kernel.
cudaError_t lora_decode_forward(const LoraDecodeArgs& args);

}  // namespace fusedlora
