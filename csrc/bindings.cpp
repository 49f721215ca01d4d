// pybind11 binding of fusedlora's CUDA kernels: the only file that includes
// torch. Every argument is checked here, before any launch, with ValueError /
// TypeError naming the argument (dtype and shape checks come before the
// device check so they can be tested on a machine without a GPU).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <sstream>
#include <string>
#include <tuple>

#include "fusedlora.h"

namespace py = pybind11;

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
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

// Last dimension with unit stride (rows may be padded); small operands are
// copied to get it, the weight never is.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Returns (y, u): y = x W^T + b + u B^T, u = scaling * x A^T (float32, saved for backward).
std::tuple<at::Tensor, at::Tensor> lora_decode(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, double scaling) {
  const auto dtype = dtype_of(x, "x");
  same_dtype(weight, x, "weight");
  same_dtype(lora_A, x, "lora_A");
  same_dtype(lora_B, x, "lora_B");
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
  value_check(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1,
              "lora_A: expected shape (r, " + std::to_string(K) + "), got " + shape_of(lora_A));
  const int64_t R = lora_A.size(0);
  value_check(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == R,
              "lora_B: expected shape (" + std::to_string(N) + ", " + std::to_string(R) + "), got " +
                  shape_of(lora_B));
  if (bias.has_value()) {
    same_dtype(*bias, x, "bias");
    value_check(bias->dim() == 1 && bias->size(0) == N,
                "bias: expected shape (" + std::to_string(N) + ",), got " + shape_of(*bias));
  }
  value_check(N < (1LL << 31) && K < (1LL << 31) && R < (1LL << 31), "weight: dimensions must fit in int32");
  for (const auto* t : {&x, &weight, &lora_A, &lora_B}) {
    value_check(t->is_cuda() && t->device() == x.device(),
                "x, weight, lora_A, lora_B, bias: expected CUDA tensors on one device, got " +
                    t->device().str() + " and " + x.device().str());
  }
  if (bias.has_value()) value_check(bias->device() == x.device(), "bias: expected x's device, got " + bias->device().str());

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = unit_last(x), as = unit_last(lora_A), bs = unit_last(lora_B);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());
  const int k_split = fusedlora::lora_decode_k_split(static_cast<int>(N), static_cast<int>(K), sms);

  auto y = at::empty({M, N}, x.options());
  auto u = at::zeros({M, R}, x.options().dtype(at::kFloat));
  auto partial = k_split > 1 ? at::zeros({M, N}, x.options().dtype(at::kFloat)) : at::Tensor();

  fusedlora::LoraDecodeArgs args;
  args.dtype = dtype;
  args.x = xs.data_ptr();
  args.w = weight.data_ptr();
  args.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  args.a = as.data_ptr();
  args.b = bs.data_ptr();
  args.y = y.data_ptr();
  args.u = u.data_ptr<float>();
  args.partial = k_split > 1 ? partial.data_ptr<float>() : nullptr;
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.R = static_cast<int>(R);
  args.ld_x = xs.stride(0);
  args.ld_w = weight.stride(0);
  args.ld_a = as.stride(0);
  args.stride_bn = bs.stride(0);
  args.stride_bj = 1;
  args.scaling = static_cast<float>(scaling);
  args.k_split = k_split;
  args.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = fusedlora::lora_decode_forward(args);
  if (err != cudaSuccess) throw std::runtime_error(std::string("fusedlora lora_decode: ") + cudaGetErrorString(err));
  return {y, u};
}

void int32_table(const at::Tensor& t, const char* name, const at::Tensor& x) {
  if (t.scalar_type() != at::kInt)
    throw py::type_error(std::string(name) + ": expected int32, got " + c10::toString(t.scalar_type()));
  value_check(t.dim() == 1, std::string(name) + ": expected a 1-D tensor, got shape " + shape_of(t));
  value_check(t.device() == x.device(), std::string(name) + ": expected x's device " + x.device().str() + ", got " +
                                            t.device().str());
}

// BGMV: row m uses pooled adapter slot row_slot[m] (-1: base only). Table values are
// the caller's contract (fusedlora.multi checks them; no host sync here).
std::tuple<at::Tensor, at::Tensor> multi_lora_decode(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& row_slot,
                                                     const at::Tensor& pool_A, const at::Tensor& pool_BT,
                                                     const at::Tensor& slot_off, const at::Tensor& slot_rank,
                                                     const at::Tensor& slot_scale, int64_t max_rank) {
  const auto dtype = dtype_of(x, "x");
  same_dtype(weight, x, "weight");
  same_dtype(pool_A, x, "pool_A");
  same_dtype(pool_BT, x, "pool_BT");
  value_check(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "x, weight: expected (rows, K) and (N, K), got " + shape_of(x) + " and " + shape_of(weight));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  value_check(M >= 1 && M <= fusedlora::kMaxDecodeRows,
              "x: the decode kernels take 1 to 16 rows, got " + std::to_string(M));
  value_check(weight.stride(1) == 1, "weight: expected unit stride along in_features (row-major)");
  value_check(pool_A.dim() == 2 && pool_A.size(1) == K && pool_A.stride(1) == 1,
              "pool_A: expected (R_total, " + std::to_string(K) + ") with unit stride along K, got " + shape_of(pool_A));
  value_check(pool_BT.dim() == 2 && pool_BT.size(1) == N && pool_BT.size(0) == pool_A.size(0) &&
                  pool_BT.stride(1) == 1,
              "pool_BT: expected (" + std::to_string(pool_A.size(0)) + ", " + std::to_string(N) +
                  ") with unit stride along N, got " + shape_of(pool_BT));
  if (bias.has_value()) {
    same_dtype(*bias, x, "bias");
    value_check(bias->dim() == 1 && bias->size(0) == N, "bias: expected shape (" + std::to_string(N) + ",)");
  }
  int32_table(row_slot, "row_slot", x);
  int32_table(slot_off, "slot_off", x);
  int32_table(slot_rank, "slot_rank", x);
  if (slot_scale.scalar_type() != at::kFloat)
    throw py::type_error("slot_scale: expected float32, got " + std::string(c10::toString(slot_scale.scalar_type())));
  value_check(row_slot.size(0) == M, "row_slot: expected one slot per row of x");
  value_check(slot_rank.size(0) == slot_off.size(0) && slot_scale.dim() == 1 &&
                  slot_scale.size(0) == slot_off.size(0),
              "slot_off, slot_rank, slot_scale: expected one entry per slot each");
  value_check(max_rank >= 0 && max_rank <= pool_A.size(0), "max_rank: expected 0 .. pool rows, got " +
                                                               std::to_string(max_rank));
  for (const auto* t : {&x, &weight, &pool_A, &pool_BT, &slot_scale})
    value_check(t->is_cuda() && t->device() == x.device(), "x, weight, pools, tables: expected CUDA tensors on one device");
  if (bias.has_value()) value_check(bias->device() == x.device(), "bias: expected x's device");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = unit_last(x);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor slots = row_slot.contiguous(), offs = slot_off.contiguous(), ranks = slot_rank.contiguous(),
                   scales = slot_scale.contiguous();
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());
  const int k_split = fusedlora::lora_decode_k_split(static_cast<int>(N), static_cast<int>(K), sms);
  auto y = at::empty({M, N}, x.options());
  auto u = at::zeros({M, max_rank}, x.options().dtype(at::kFloat));
  auto partial = k_split > 1 ? at::zeros({M, N}, x.options().dtype(at::kFloat)) : at::Tensor();

  fusedlora::LoraDecodeArgs args;
  args.dtype = dtype;
  args.x = xs.data_ptr();
  args.w = weight.data_ptr();
  args.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  args.a = pool_A.data_ptr();
  args.b = pool_BT.data_ptr();
  args.y = y.data_ptr();
  args.u = u.data_ptr<float>();
  args.partial = k_split > 1 ? partial.data_ptr<float>() : nullptr;
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.R = static_cast<int>(max_rank);
  args.ld_x = xs.stride(0);
  args.ld_w = weight.stride(0);
  args.ld_a = pool_A.stride(0);
  args.stride_bn = 1;  // B(n, i) = pool_BT[i, n]
  args.stride_bj = pool_BT.stride(0);
  args.scaling = 0.f;
  args.row_slot = slots.data_ptr<int>();
  args.slot_off = offs.data_ptr<int>();
  args.slot_rank = ranks.data_ptr<int>();
  args.slot_scale = scales.data_ptr<float>();
  args.k_split = k_split;
  args.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = fusedlora::lora_decode_forward(args);
  if (err != cudaSuccess) throw std::runtime_error(std::string("fusedlora multi_lora_decode: ") + cudaGetErrorString(err));
  return {y, u};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedlora CUDA kernels (decode regime)";
  m.def("lora_decode", &lora_decode, "Fused LoRA linear for 1..16 rows: returns (y, u)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"));
  m.def("multi_lora_decode", &multi_lora_decode,
        "BGMV: fused base GEMV + per-row pooled LoRA for 1..16 rows: returns (y, u)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("row_slot"), py::arg("pool_A"), py::arg("pool_BT"), py::arg("slot_off"),
        py::arg("slot_rank"), py::arg("slot_scale"), py::arg("max_rank"));
  m.attr("max_decode_rows") = fusedlora::kMaxDecodeRows;
}
