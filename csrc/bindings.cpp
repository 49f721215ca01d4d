// pybind11 binding of fusedlora's CUDA kernels: the only file that includes
// torch. Every argument is checked here, before any launch, with ValueError /
// TypeError naming the argument (dtype and shape checks come before the
// device check so they can be tested on a machine without a GPU). Values of
// index tables are the caller's contract (the Python layer checks them), so
// that no call here synchronises with the host.
//
// No iostreams here: a toolchain that links libstdc++ statically (the H200 image's
// g++ wrapper did) puts a second copy of std::ostream in this module, and its locale
// facets clash with the process's libstdc++ at the first `<<`: a segfault inside the
// argument checks (bench/results/2026-11-27_h200_2). Shapes are formatted by hand, and
// the build links libstdc++ as a shared library (fusedlora/cuda_ext.py, setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <initializer_list>
#include <string>
#include <tuple>

#include "fusedlora.h"

namespace py = pybind11;

namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

void value_check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

fusedlora::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fusedlora::DType::kFloat32;
    case at::kHalf: return fusedlora::DType::kFloat16;
    case at::kBFloat16: return fusedlora::DType::kBFloat16;
    default: break;
  }
  throw py::type_error(std::string(name) + ": expected float32, float16 or bfloat16, got " +
                       std::string(c10::toString(t.scalar_type())));
}

void same_dtype(const at::Tensor& t, const at::Tensor& x, const char* name) {
  if (t.scalar_type() != x.scalar_type())
    throw py::type_error(std::string(name) + ": dtype " + c10::toString(t.scalar_type()) +
                         " does not match x's dtype " + c10::toString(x.scalar_type()));
}

void typed_vector(const at::Tensor& t, at::ScalarType type, const char* name) {
  if (t.scalar_type() != type)
    throw py::type_error(std::string(name) + ": expected " +
                         (type == at::kInt ? "int32" : type == at::kLong ? "int64" : "float32") + ", got " +
                         c10::toString(t.scalar_type()));
  value_check(t.dim() == 1, std::string(name) + ": expected a 1-D tensor, got shape " + shape_of(t));
}

void on_device_of(std::initializer_list<const at::Tensor*> tensors, const at::Tensor& x) {
  for (const auto* t : tensors)
    value_check(t->is_cuda() && t->device() == x.device(),
                "all tensors: expected CUDA tensors on x's device, got " + t->device().str() + " and " +
                    x.device().str());
}

// Last dimension with unit stride (rows may be padded); small operands are
// copied to get it, the weight never is.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The base layer's checks, shared by every entry point; fills the base fields of args.
fusedlora::LoraDecodeArgs check_base(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const std::string& gemv = "fma") {
  fusedlora::LoraDecodeArgs args;
  value_check(gemv == "fma" || gemv == "mma", "gemv: expected 'fma' or 'mma', got '" + gemv + "'");
  args.gemv = gemv == "mma" ? fusedlora::Gemv::kMma : fusedlora::Gemv::kFma;
  args.dtype = dtype_of(x, "x");
  same_dtype(weight, x, "weight");
  value_check(x.dim() == 2, "x: expected a 2-D (rows, in_features) tensor, got shape " + shape_of(x));
  value_check(weight.dim() == 2, "weight: expected a 2-D tensor, got shape " + shape_of(weight));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  value_check(M >= 1 && M <= fusedlora::kMaxDecodeRows,
              "x: the decode kernels take 1 to 16 rows, got " + std::to_string(M));
  value_check(weight.size(1) == K, "weight: expected shape (out_features, " + std::to_string(K) + "), got " +
                                       shape_of(weight));
  value_check(weight.stride(1) == 1, "weight: expected unit stride along in_features (row-major), got strides (" +
                                         std::to_string(weight.stride(0)) + ", " + std::to_string(weight.stride(1)) +
                                         ")");
  value_check(N <= fusedlora::kMaxFeatures && K <= fusedlora::kMaxFeatures,
              "weight: the decode kernels take at most 2^30 features on each side, got " + shape_of(weight));
  value_check(N >= 1 && K >= 1, "weight: the decode kernels need at least one output and one input feature, got " +
                                    shape_of(weight));
  if (bias.has_value()) {
    same_dtype(*bias, x, "bias");
    value_check(bias->dim() == 1 && bias->size(0) == N,
                "bias: expected shape (" + std::to_string(N) + ",), got " + shape_of(*bias));
  }
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.R = 0;
  args.a = args.b = nullptr;
  args.ld_a = args.stride_bn = args.stride_bj = 0;
  args.scaling = 0.f;
  return args;
}

// Allocates y, u (M x R) and the splits' partials, launches, raises on a CUDA error.
std::tuple<at::Tensor, at::Tensor> run(fusedlora::LoraDecodeArgs& args, const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const char* what) {
  on_device_of({&x, &weight}, x);
  if (bias.has_value()) on_device_of({&*bias}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = unit_last(x);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  int sms = 0;
  cudaError_t attr = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());
  if (attr == cudaSuccess)
    attr = cudaDeviceGetAttribute(&args.sm_major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  if (attr != cudaSuccess)
    throw std::runtime_error(std::string("fusedlora ") + what + ": device attributes: " + cudaGetErrorString(attr));
  args.x = xs.data_ptr();
  args.ld_x = xs.stride(0);
  args.w = weight.data_ptr();
  args.ld_w = weight.stride(0);
  value_check(args.gemv != fusedlora::Gemv::kMma || fusedlora::mma_serves(args),
              std::string("gemv: 'mma' needs float16/bfloat16 operands, rows of x and weight 16-byte aligned "
                          "(leading strides multiples of 8) and an sm_80+ GPU (") + what + " got dtype " +
                  c10::toString(x.scalar_type()) + ", strides " + std::to_string(args.ld_x) + " and " +
                  std::to_string(args.ld_w) + ", sm_" + std::to_string(args.sm_major) + "x)");
  args.k_split = fusedlora::lora_decode_k_split(args, sms);
  // Every element of u and of the splits' partials is stored by a kernel: nothing to zero.
  auto y = at::empty({args.M, args.N}, x.options());
  auto u = at::empty({args.M, args.R}, x.options().dtype(at::kFloat));
  auto partial = at::empty({args.k_split, args.M, args.N}, x.options().dtype(at::kFloat));
  args.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.u = u.data_ptr<float>();
  args.partial = partial.data_ptr<float>();
  args.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = fusedlora::lora_decode_forward(args);
  if (err != cudaSuccess) throw std::runtime_error(std::string("fusedlora ") + what + ": " + cudaGetErrorString(err));
  return {y, u};
}

// One adapter for every row. Returns (y, u): u = scaling * x A^T (float32, saved for backward).
std::tuple<at::Tensor, at::Tensor> lora_decode(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, double scaling, const std::string& gemv) {
  auto args = check_base(x, weight, bias, gemv);
  same_dtype(lora_A, x, "lora_A");
  same_dtype(lora_B, x, "lora_B");
  value_check(lora_A.dim() == 2 && lora_A.size(1) == args.K && lora_A.size(0) >= 1,
              "lora_A: expected shape (r, " + std::to_string(args.K) + "), got " + shape_of(lora_A));
  const int64_t R = lora_A.size(0);
  value_check(lora_B.dim() == 2 && lora_B.size(0) == args.N && lora_B.size(1) == R,
              "lora_B: expected shape (" + std::to_string(args.N) + ", " + std::to_string(R) + "), got " +
                  shape_of(lora_B));
  on_device_of({&lora_A, &lora_B}, x);
  const at::Tensor as = unit_last(lora_A), bs = unit_last(lora_B);
  args.R = static_cast<int>(R);
  args.a = as.data_ptr();
  args.ld_a = as.stride(0);
  args.b = bs.data_ptr();
  args.stride_bn = bs.stride(0);
  args.stride_bj = 1;
  args.scaling = static_cast<float>(scaling);
  return run(args, x, weight, bias, "lora_decode");
}

// BGMV: row m uses pooled adapter slot row_slot[m] (-1: base only).
std::tuple<at::Tensor, at::Tensor> multi_lora_decode(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& row_slot,
                                                     const at::Tensor& pool_A, const at::Tensor& pool_BT,
                                                     const at::Tensor& slot_off, const at::Tensor& slot_rank,
                                                     const at::Tensor& slot_scale, int64_t max_rank,
                                                     const std::string& gemv) {
  auto args = check_base(x, weight, bias, gemv);
  same_dtype(pool_A, x, "pool_A");
  same_dtype(pool_BT, x, "pool_BT");
  value_check(pool_A.dim() == 2 && pool_A.size(1) == args.K && pool_A.stride(1) == 1 && pool_A.size(0) < (1LL << 31),
              "pool_A: expected (R_total, " + std::to_string(args.K) + ") with unit stride along K, got " +
                  shape_of(pool_A));
  value_check(pool_BT.dim() == 2 && pool_BT.size(1) == args.N && pool_BT.size(0) == pool_A.size(0) &&
                  pool_BT.stride(1) == 1,
              "pool_BT: expected (" + std::to_string(pool_A.size(0)) + ", " + std::to_string(args.N) +
                  ") with unit stride along N, got " + shape_of(pool_BT));
  typed_vector(row_slot, at::kInt, "row_slot");
  typed_vector(slot_off, at::kInt, "slot_off");
  typed_vector(slot_rank, at::kInt, "slot_rank");
  typed_vector(slot_scale, at::kFloat, "slot_scale");
  value_check(row_slot.size(0) == args.M, "row_slot: expected one slot per row of x");
  value_check(slot_rank.size(0) == slot_off.size(0) && slot_scale.size(0) == slot_off.size(0),
              "slot_off, slot_rank, slot_scale: expected one entry per slot each");
  // any width of u at least the largest rank (the caller's promise, as on Triton; a fixed one
  // for static graph buckets may pass the pool's rows, and u's index is 64-bit); a shrink block
  // j reads pooled rows only where j is below its row's rank, clipped to the pool
  value_check(max_rank >= 0 && max_rank < (1LL << 24),
              "max_rank: expected 0 .. 2^24 - 1 (u is rows x max_rank), got " + std::to_string(max_rank));
  on_device_of({&pool_A, &pool_BT, &row_slot, &slot_off, &slot_rank, &slot_scale}, x);
  const at::Tensor slots = row_slot.contiguous(), offs = slot_off.contiguous(), ranks = slot_rank.contiguous(),
                   scales = slot_scale.contiguous();
  args.R = static_cast<int>(max_rank);
  args.a = pool_A.data_ptr();
  args.ld_a = pool_A.stride(0);
  args.b = pool_BT.data_ptr();
  args.stride_bn = 1;  // B(n, i) = pool_BT[i, n]
  args.stride_bj = pool_BT.stride(0);
  args.row_slot = slots.data_ptr<int>();
  args.slot_off = offs.data_ptr<int>();
  args.slot_rank = ranks.data_ptr<int>();
  args.slot_scale = scales.data_ptr<float>();
  args.num_slots = static_cast<int>(slot_off.size(0));
  args.pool_rows = static_cast<int>(pool_A.size(0));
  return run(args, x, weight, bias, "multi_lora_decode");
}

// C3A: W + the block-circulant delta of c3a_kernel (out/b, in/b, b), float32, / in_features.
at::Tensor c3a_decode(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const at::Tensor& c3a_kernel) {
  auto args = check_base(x, weight, bias);
  if (c3a_kernel.scalar_type() != at::kFloat)
    throw py::type_error("c3a_kernel: expected float32, got " + std::string(c10::toString(c3a_kernel.scalar_type())));
  value_check(c3a_kernel.dim() == 3 && c3a_kernel.size(2) >= 1 && c3a_kernel.size(0) * c3a_kernel.size(2) == args.N &&
                  c3a_kernel.size(1) * c3a_kernel.size(2) == args.K,
              "c3a_kernel: expected (out/b, in/b, b) for out=" + std::to_string(args.N) + ", in=" +
                  std::to_string(args.K) + ", got " + shape_of(c3a_kernel));
  on_device_of({&c3a_kernel}, x);
  args.delta.c3a = c3a_kernel.data_ptr<float>();
  args.delta.c3a_s0 = c3a_kernel.stride(0);
  args.delta.c3a_s1 = c3a_kernel.stride(1);
  args.delta.c3a_s2 = c3a_kernel.stride(2);
  args.delta.c3a_block = static_cast<int>(c3a_kernel.size(2));
  args.delta.c3a_scale = 1.f / static_cast<float>(args.K);
  return std::get<0>(run(args, x, weight, bias, "c3a_decode"));
}

// Sparse delta: W + scaling * S, S's rows in CSR (row_ptr int32 (N+1,), col int32,
// order int64: CSR position -> index into values, which keep the user's order and dtype).
at::Tensor sparse_decode(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& order,
                         const at::Tensor& values, double scaling, const std::string& gemv) {
  auto args = check_base(x, weight, bias, gemv);
  typed_vector(row_ptr, at::kInt, "row_ptr");
  typed_vector(col, at::kInt, "col");
  typed_vector(order, at::kLong, "order");
  value_check(values.dim() == 1, "values: expected a 1-D tensor, got shape " + shape_of(values));
  const fusedlora::DType val_dtype = dtype_of(values, "values");
  value_check(row_ptr.size(0) == args.N + 1, "row_ptr: expected out_features + 1 = " + std::to_string(args.N + 1) +
                                                  " entries, got " + std::to_string(row_ptr.size(0)));
  value_check(col.size(0) < (1LL << 31), "col: the CSR positions are int32: at most 2^31 - 1 nonzeros, got " +
                                             std::to_string(col.size(0)));
  value_check(col.size(0) == order.size(0) && values.size(0) == col.size(0),
              "col, order, values: expected one entry per nonzero each, got " + std::to_string(col.size(0)) + ", " +
                  std::to_string(order.size(0)) + " and " + std::to_string(values.size(0)));
  on_device_of({&row_ptr, &col, &order, &values}, x);
  const at::Tensor rp = row_ptr.contiguous(), cs = col.contiguous(), os = order.contiguous(),
                   vs = values.contiguous();
  args.delta.sp_row_ptr = rp.data_ptr<int>();
  args.delta.sp_col = cs.data_ptr<int>();
  args.delta.sp_order = os.data_ptr<int64_t>();
  args.delta.sp_val = vs.data_ptr();
  args.delta.sp_val_dtype = val_dtype;
  args.delta.sp_scale = static_cast<float>(scaling);
  return std::get<0>(run(args, x, weight, bias, "sparse_decode"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedlora CUDA kernels (decode regime: 1..16 rows)";
  m.def("lora_decode", &lora_decode, "Fused base GEMV + LoRA: returns (y, u)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("gemv") = "fma");
  m.def("multi_lora_decode", &multi_lora_decode, "BGMV: fused base GEMV + per-row pooled LoRA: returns (y, u)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("row_slot"), py::arg("pool_A"), py::arg("pool_BT"),
        py::arg("slot_off"), py::arg("slot_rank"), py::arg("slot_scale"), py::arg("max_rank"),
        py::arg("gemv") = "fma");
  m.def("c3a_decode", &c3a_decode, "Fused base GEMV + C3A (circulant generated on the fly): returns y", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("c3a_kernel"));
  m.def("sparse_decode", &sparse_decode, "Fused base GEMV + sparse delta (CSR rows): returns y", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("row_ptr"), py::arg("col"), py::arg("order"), py::arg("values"), py::arg("scaling"),
        py::arg("gemv") = "fma");
  m.attr("max_decode_rows") = fusedlora::kMaxDecodeRows;
}
