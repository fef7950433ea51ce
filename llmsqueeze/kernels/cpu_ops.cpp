// The float32 CPU kernels of cpu_kernels.c as torch operators registered in C++ (llmsqueeze_c::*).
//
// torch.compile calls an operator from its generated wrapper; a Python custom op costs ~90 us per
// call there (dispatch into Python, argument boxing, ctypes), which at ~210 GEMVs per decode step of
// a 30-layer model is more time than the GEMVs themselves. These operators dispatch in C++ and call
// the kernels through function pointers taken from the ctypes-loaded library (one source of kernels,
// built once by kernels/cpu.py), set by set_kernels() before the first call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using gemv_q_fn = int (*)(const float *, int64_t, int64_t, const int32_t *, const void *, int, const int32_t *,
                          int64_t, const float *, float *, int64_t, int64_t, int, int);
using dequant_q_fn = int (*)(const int32_t *, const void *, int, const int32_t *, int64_t, float *, int64_t, int64_t,
                             int64_t, int, int64_t, int64_t, int);
using gemv_w16_fn = int (*)(const float *, int64_t, int64_t, const uint16_t *, int, const float *, float *, int64_t,
                            int);

gemv_q_fn g_gemv_q = nullptr;
dequant_q_fn g_dequant_q = nullptr;
gemv_w16_fn g_gemv_w16 = nullptr;

int scale_code(const at::Tensor &s) {
  switch (s.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "llmsqueeze_c: scales must be float32, float16 or bfloat16, got ", s.scalar_type());
  }
}

void check_rc(int rc, const char *what) { TORCH_CHECK(rc == 0, "llmsqueeze CPU kernel ", what, " refused its arguments (code ", rc, ")"); }

void set_kernels(int64_t gemv_q, int64_t dequant_q, int64_t gemv_w16) {
  g_gemv_q = reinterpret_cast<gemv_q_fn>(gemv_q);
  g_dequant_q = reinterpret_cast<dequant_q_fn>(dequant_q);
  g_gemv_w16 = reinterpret_cast<gemv_w16_fn>(gemv_w16);
}

// x [M, K] float32 -> x @ W^T + bias [M, N] float32 from the packed layout (kernels/cpu.py)
at::Tensor gemv_q(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales, const at::Tensor &qzeros,
                  int64_t bits, int64_t group_size, int64_t in_features, const std::optional<at::Tensor> &bias) {
  TORCH_CHECK(g_gemv_q, "llmsqueeze_c: set_kernels() was not called");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == at::kFloat, "llmsqueeze_c::gemv_q: x must be float32 [M, ", in_features, "]");
  at::Tensor xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const int64_t m = xc.size(0), n = qweight.size(1);
  at::Tensor out = at::empty({m, n}, xc.options());
  check_rc(g_gemv_q(xc.data_ptr<float>(), m, in_features, qweight.data_ptr<int32_t>(), scales.data_ptr(),
                    scale_code(scales), qzeros.data_ptr<int32_t>(), qzeros.size(1), b.defined() ? b.data_ptr<float>() : nullptr,
                    out.data_ptr<float>(), n, group_size, static_cast<int>(bits), at::get_num_threads()),
           "gemv_q");
  return out;
}

// -> W^T float32 [K, N] = (q - zero) * scale
at::Tensor dequantize_q(const at::Tensor &qweight, const at::Tensor &scales, const at::Tensor &qzeros, int64_t bits,
                        int64_t group_size, int64_t in_features) {
  TORCH_CHECK(g_dequant_q, "llmsqueeze_c: set_kernels() was not called");
  const int64_t n = qweight.size(1);
  at::Tensor w = at::empty({in_features, n}, qweight.options().dtype(at::kFloat));
  check_rc(g_dequant_q(qweight.data_ptr<int32_t>(), scales.data_ptr(), scale_code(scales), qzeros.data_ptr<int32_t>(),
                       qzeros.size(1), w.data_ptr<float>(), in_features, n, group_size, static_cast<int>(bits), 0, n,
                       at::get_num_threads()),
           "dequantize_q");
  return w;
}

// prefill: x [M, K] float32 -> x @ W^T + bias [M, N] float32, W^T dequantized tile_cols columns at a time
// into this thread's reused buffer and each tile handed to the BLAS GEMM (what QuantLinear's eager
// "tiles" path does, tile for tile, so the result is the same bit for bit)
at::Tensor tiles_mm(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales, const at::Tensor &qzeros,
                    int64_t bits, int64_t group_size, int64_t in_features, const std::optional<at::Tensor> &bias,
                    int64_t tile_cols) {
  TORCH_CHECK(g_dequant_q, "llmsqueeze_c: set_kernels() was not called");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == at::kFloat, "llmsqueeze_c::tiles_mm: x must be float32 [M, ", in_features, "]");
  TORCH_CHECK(tile_cols > 0, "llmsqueeze_c::tiles_mm: tile_cols must be positive");
  at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), n = qweight.size(1), k = in_features;
  const int64_t step = tile_cols < n ? tile_cols : n;
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.numel() < k * step) buf = at::empty({k * step}, xc.options());
  at::Tensor out = at::empty({m, n}, xc.options());
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t n1 = n0 + step < n ? n0 + step : n;
    check_rc(g_dequant_q(qweight.data_ptr<int32_t>(), scales.data_ptr(), scale_code(scales), qzeros.data_ptr<int32_t>(),
                         qzeros.size(1), buf.data_ptr<float>(), k, n, group_size, static_cast<int>(bits), n0, n1,
                         at::get_num_threads()),
             "dequantize_q");
    at::Tensor tile = buf.narrow(0, 0, k * (n1 - n0)).view({k, n1 - n0});
    at::Tensor dst = out.narrow(1, n0, n1 - n0);
    at::mm_out(dst, xc, tile);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out;
}

// x [M, K] float32, weight [N, K] bfloat16/float16 -> x @ weight^T + bias [M, N] float32
at::Tensor gemv_w16(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias) {
  TORCH_CHECK(g_gemv_w16, "llmsqueeze_c: set_kernels() was not called");
  TORCH_CHECK(weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16, "llmsqueeze_c::gemv_w16: weight must be float16 or bfloat16");
  at::Tensor xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = weight.size(0);
  at::Tensor out = at::empty({m, n}, xc.options());
  check_rc(g_gemv_w16(xc.data_ptr<float>(), m, k, static_cast<const uint16_t *>(weight.data_ptr()),
                      weight.scalar_type() == at::kHalf ? 1 : 2, b.defined() ? b.data_ptr<float>() : nullptr,
                      out.data_ptr<float>(), n, at::get_num_threads()),
           "gemv_w16");
  return out;
}

}  // namespace

TORCH_LIBRARY(llmsqueeze_c, m) {
  m.def("set_kernels(int gemv_q, int dequant_q, int gemv_w16) -> ()", &set_kernels);
  m.def("gemv_q(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size, int in_features, Tensor? bias) -> Tensor");
  m.def("dequantize_q(Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size, int in_features) -> Tensor");
  m.def("gemv_w16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("tiles_mm(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size, int in_features, Tensor? bias, int tile_cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmsqueeze_c, CPU, m) {
  m.impl("gemv_q", &gemv_q);
  m.impl("dequantize_q", &dequantize_q);
  m.impl("gemv_w16", &gemv_w16);
  m.impl("tiles_mm", &tiles_mm);
}
