// Host-side helpers shared by the CPU and CUDA op implementations:
// activation-name parsing, input validation, output allocation, compile-time dispatch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "activations.h"

namespace fused_ckpt {

struct ActSpec {
  int base;
  bool gated;
};

// Must agree with fused_ckpt/activations.py::ACTIVATIONS.
inline ActSpec parse_activation(c10::string_view name) {
  if (name == "relu") return {RELU, false};
  if (name == "gelu") return {GELU, false};
  if (name == "gelu_tanh") return {GELU_TANH, false};
  if (name == "silu") return {SILU, false};
  if (name == "swiglu") return {SILU, true};
  if (name == "geglu") return {GELU, true};
  if (name == "geglu_tanh") return {GELU_TANH, true};
  TORCH_CHECK(false, "fused_ckpt_ext: unknown activation '", std::string(name.data(), name.size()),
              "'; supported: geglu, geglu_tanh, gelu, gelu_tanh, relu, silu, swiglu");
}

// Calls fn(std::integral_constant<int, BASE>, std::integral_constant<bool, GATED>) for the
// seven named activations only (gated relu is not a registered name, so it is never built).
template <typename Fn>
inline void dispatch_activation(const ActSpec& spec, Fn&& fn) {
  using std::integral_constant;
  if (spec.gated) {
    switch (spec.base) {
      case SILU: fn(integral_constant<int, SILU>{}, integral_constant<bool, true>{}); return;
      case GELU: fn(integral_constant<int, GELU>{}, integral_constant<bool, true>{}); return;
      case GELU_TANH: fn(integral_constant<int, GELU_TANH>{}, integral_constant<bool, true>{}); return;
      default: break;
    }
  } else {
    switch (spec.base) {
      case RELU: fn(integral_constant<int, RELU>{}, integral_constant<bool, false>{}); return;
      case GELU: fn(integral_constant<int, GELU>{}, integral_constant<bool, false>{}); return;
      case GELU_TANH: fn(integral_constant<int, GELU_TANH>{}, integral_constant<bool, false>{}); return;
      case SILU: fn(integral_constant<int, SILU>{}, integral_constant<bool, false>{}); return;
      default: break;
    }
  }
  TORCH_CHECK(false, "fused_ckpt_ext: internal error, bad activation spec");
}

// Validates z (and dh) and returns f, the width of h.
inline int64_t check_inputs(const at::Tensor& z, const at::Tensor* dh, const ActSpec& spec,
                            c10::string_view name, bool allow_double) {
  const std::string act(name.data(), name.size());
  TORCH_CHECK(z.dim() == 2, "fused_ckpt_ext: z must be 2-D [M, F1], got ", z.dim(),
              "-D tensor of shape ", z.sizes());
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (allow_double && dt == at::kDouble),
              "fused_ckpt_ext: z has unsupported dtype ", dt, " on ", z.device(),
              "; expected float32, float16 or bfloat16", allow_double ? " (or float64)" : "");
  const int64_t M = z.size(0);
  const int64_t F1 = z.size(1);
  if (spec.gated) {
    TORCH_CHECK(F1 % 2 == 0, "fused_ckpt_ext: gated activation '", act,
                "' needs an even last dimension [gate | up], got z of shape ", z.sizes());
  }
  const int64_t f = spec.gated ? F1 / 2 : F1;
  if (dh != nullptr) {
    TORCH_CHECK(dh->dim() == 2 && dh->size(0) == M && dh->size(1) == f,
                "fused_ckpt_ext: dh must have shape [", M, ", ", f, "] for z of shape ", z.sizes(),
                " and activation '", act, "', got ", dh->sizes());
    TORCH_CHECK(dh->scalar_type() == dt, "fused_ckpt_ext: dh dtype ", dh->scalar_type(),
                " does not match z dtype ", dt);
    TORCH_CHECK(dh->device() == z.device(), "fused_ckpt_ext: dh is on ", dh->device(),
                " but z is on ", z.device());
  }
  return f;
}

}  // namespace fused_ckpt
