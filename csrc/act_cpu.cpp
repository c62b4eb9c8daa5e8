// CPU kernels for fused_ckpt_ext::act_forward / act_backward.
//
// Vectorised with at::vec::Vectorized<float> (fp16/bf16 are loaded as 16-bit vectors and
// converted to two float vectors), parallel with at::parallel_for, scalar tail through the
// same templates from activations.h with T = float (T = double for float64 inputs, which
// take the scalar path only: they exist for references, not speed).
//
// Which SIMD ISA Vectorized<float> maps to is fixed at build time: setup.py compiles this file
// with the AVX512 or AVX2 flags and CPU_CAPABILITY_* macros ATen uses, when the build machine
// supports them (FUSED_CKPT_CPU_SIMD); otherwise the portable Vectorized fallback is used.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "act_common.h"
#include "activations.h"

#if defined(CPU_CAPABILITY_AVX2) && !defined(__AVX2__)
#error "CPU_CAPABILITY_AVX2 is defined but the compiler is not targeting AVX2 (-mavx2 -mfma -mf16c)"
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#error "CPU_CAPABILITY_AVX512 is defined but the compiler is not targeting AVX512 (-mavx512f ...)"
#endif

namespace fused_ckpt {

using Vec = at::vec::Vectorized<float>;

// SIMD primitives for activations.h.
template <>
struct MathOps<Vec> {
  static inline Vec exp(const Vec& x) { return x.exp(); }
  static inline Vec erf(const Vec& x) { return x.erf(); }
  static inline Vec relu(const Vec& x) { return at::vec::maximum(x, Vec(0.0f)); }  // keeps NaN
  static inline Vec step(const Vec& x) { return Vec::blendv(Vec(0.0f), Vec(1.0f), x > Vec(0.0f)); }
  static inline Vec abs(const Vec& x) { return x.abs(); }
  // blendv(a, b, mask) takes b where mask is set.
  static inline Vec where_nonneg(const Vec& x, const Vec& a, const Vec& b) {
    return Vec::blendv(b, a, x >= Vec(0.0f));
  }
};

namespace {

constexpr int64_t kVecLen = Vec::size();
// One iteration handles two float vectors: one 16-bit vector of fp16/bf16 converts to exactly two.
constexpr int64_t kStep = 2 * kVecLen;

template <typename scalar_t>
constexpr bool kVectorizable = std::is_same_v<scalar_t, float> ||
                               std::is_same_v<scalar_t, at::Half> ||
                               std::is_same_v<scalar_t, at::BFloat16>;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
inline void load2(const scalar_t* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVecLen);
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kStep, "unexpected vector width");
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store2(scalar_t* p, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + kVecLen);
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// h[i] = f(g[i]) (* u[i] when GATED), i < n.  u is unused (may be null) when !GATED.
template <typename scalar_t, int BASE, bool GATED>
void forward_span(const scalar_t* g, const scalar_t* u, scalar_t* h, int64_t n) {
  using T = acc_t<scalar_t>;
  int64_t i = 0;
  if constexpr (kVectorizable<scalar_t>) {
    for (; i + kStep <= n; i += kStep) {
      Vec g0, g1, u0(0.0f), u1(0.0f);
      load2(g + i, g0, g1);
      if constexpr (GATED) load2(u + i, u0, u1);
      store2(h + i, act_forward_point<BASE, GATED>(g0, u0), act_forward_point<BASE, GATED>(g1, u1));
    }
  }
  for (; i < n; ++i) {
    T ui(0);
    if constexpr (GATED) ui = static_cast<T>(u[i]);
    h[i] = static_cast<scalar_t>(act_forward_point<BASE, GATED>(static_cast<T>(g[i]), ui));
  }
}

// dg[i] (= dh f'(g), times u when GATED), du[i] (= dh f(g), GATED only), h[i] (NEED_H only).
template <typename scalar_t, int BASE, bool GATED, bool NEED_H>
void backward_span(const scalar_t* g, const scalar_t* u, const scalar_t* dh, scalar_t* dg,
                   scalar_t* du, scalar_t* h, int64_t n) {
  using T = acc_t<scalar_t>;
  int64_t i = 0;
  if constexpr (kVectorizable<scalar_t>) {
    for (; i + kStep <= n; i += kStep) {
      Vec g0, g1, d0, d1, u0(0.0f), u1(0.0f);
      load2(g + i, g0, g1);
      if constexpr (GATED) load2(u + i, u0, u1);
      load2(dh + i, d0, d1);
      Vec dg0, dg1, du0, du1, h0, h1;
      act_backward_point<BASE, GATED>(g0, u0, d0, dg0, du0, h0);
      act_backward_point<BASE, GATED>(g1, u1, d1, dg1, du1, h1);
      store2(dg + i, dg0, dg1);
      if constexpr (GATED) store2(du + i, du0, du1);
      if constexpr (NEED_H) store2(h + i, h0, h1);
    }
  }
  for (; i < n; ++i) {
    T ui(0), dgi(0), dui(0), hi(0);
    if constexpr (GATED) ui = static_cast<T>(u[i]);
    act_backward_point<BASE, GATED>(static_cast<T>(g[i]), ui, static_cast<T>(dh[i]), dgi, dui, hi);
    dg[i] = static_cast<scalar_t>(dgi);
    if constexpr (GATED) du[i] = static_cast<scalar_t>(dui);
    if constexpr (NEED_H) h[i] = static_cast<scalar_t>(hi);
  }
}

// Rows per parallel task for gated inputs (each row is handled as one span of f elements).
inline int64_t row_grain(int64_t f) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(f, 1));
}

at::Tensor act_forward_cpu(const at::Tensor& z_in, c10::string_view activation) {
  const ActSpec spec = parse_activation(activation);
  const int64_t f = check_inputs(z_in, nullptr, spec, activation, /*allow_double=*/true);
  const at::Tensor z = z_in.contiguous();
  const int64_t M = z.size(0);
  at::Tensor h = at::empty({M, f}, z.options());
  if (h.numel() == 0) return h;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "act_forward_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    dispatch_activation(spec, [&](auto base_c, auto gated_c) {
      constexpr int BASE = decltype(base_c)::value;
      constexpr bool GATED = decltype(gated_c)::value;
      if constexpr (GATED) {
        at::parallel_for(0, M, row_grain(f), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* zr = zp + r * 2 * f;
            forward_span<scalar_t, BASE, true>(zr, zr + f, hp + r * f, f);
          }
        });
      } else {
        at::parallel_for(0, M * f, at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
          forward_span<scalar_t, BASE, false>(zp + b, nullptr, hp + b, e - b);
        });
      }
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> act_backward_cpu(const at::Tensor& z_in, const at::Tensor& dh_in,
                                                    c10::string_view activation, bool need_h) {
  const ActSpec spec = parse_activation(activation);
  const int64_t f = check_inputs(z_in, &dh_in, spec, activation, /*allow_double=*/true);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor dh = dh_in.contiguous();
  const int64_t M = z.size(0);
  at::Tensor dz = at::empty({M, z.size(1)}, z.options());
  at::Tensor h = need_h ? at::empty({M, f}, z.options()) : at::empty({0}, z.options());
  if (dz.numel() == 0) return {dz, h};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "act_backward_cpu", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
    scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
    scalar_t* hp = need_h ? h.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(spec, [&](auto base_c, auto gated_c) {
      constexpr int BASE = decltype(base_c)::value;
      constexpr bool GATED = decltype(gated_c)::value;
      auto run = [&](auto need_h_c) {
        constexpr bool NEED_H = decltype(need_h_c)::value;
        if constexpr (GATED) {
          at::parallel_for(0, M, row_grain(f), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const scalar_t* zr = zp + r * 2 * f;
              scalar_t* dzr = dzp + r * 2 * f;
              backward_span<scalar_t, BASE, true, NEED_H>(zr, zr + f, dhp + r * f, dzr, dzr + f,
                                                          NEED_H ? hp + r * f : nullptr, f);
            }
          });
        } else {
          at::parallel_for(0, M * f, at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
            backward_span<scalar_t, BASE, false, NEED_H>(zp + b, nullptr, dhp + b, dzp + b, nullptr,
                                                         NEED_H ? hp + b : nullptr, e - b);
          });
        }
      };
      if (need_h) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return {dz, h};
}

}  // namespace

}  // namespace fused_ckpt

TORCH_LIBRARY_IMPL(fused_ckpt_ext, CPU, m) {
  m.impl("act_forward", &fused_ckpt::act_forward_cpu);
  m.impl("act_backward", &fused_ckpt::act_backward_cpu);
}
