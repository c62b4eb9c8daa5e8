// Activation math for fused_ckpt, written once for every C++ backend.
//
// The same templates run as
//   * scalar host code            (T = float, or double for float64 references),
//   * CPU SIMD code               (T = at::vec::Vectorized<float>, see act_cpu.cpp),
//   * CUDA device code            (T = float, see act_cuda_kernels.cuh).
// A backend supplies only the primitive operations through a specialisation of
// `MathOps<T>` (exp, erf, relu, step); everything else (the formulas for f and f',
// and the gated rule) lives here.  Inputs in fp16/bf16 are upcast to fp32 before
// they reach these functions: the math is always fp32 (or fp64 for double).
//
// Base ids match fused_ckpt/activations.py: RELU=0, GELU=1, GELU_TANH=2, SILU=3.
//
//   relu       f = max(z, 0)                        f' = [z > 0]
//   gelu       f = 0.5 z (1 + erf(z / sqrt2))       f' = 0.5 (1 + erf(z / sqrt2)) + z exp(-z^2/2) / sqrt(2 pi)
//   gelu_tanh  u = sqrt(2/pi) (z + 0.044715 z^3),  t = tanh(u)
//              f = 0.5 z (1 + t)                    f' = 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
//   silu       s = sigmoid(z)
//              f = z s                              f' = s (1 + z (1 - s))
//
// gelu_tanh is evaluated through the identity 0.5 (1 + tanh(u)) = sigmoid(2u) =: s, hence
// 1 - t^2 = 4 s (1 - s):  f = z s,  f' = s + 2 sqrt(2/pi) z s (1 - s) (1 + 3 * 0.044715 z^2).
// This is the same function, needs only exp (no tanh primitive), and avoids the
// cancellations in 1 + t (z << 0) and 1 - t^2 (|z| large); see detail::sigmoid_pair.
//
// Gated activations (swiglu, geglu, geglu_tanh) take z = [g | u] and compute
//   h = f(g) u,   dg = dh u f'(g),   du = dh f(g).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__
#define FC_INLINE __forceinline__
#else
#define FC_HD
#define FC_INLINE inline
#endif

namespace fused_ckpt {

enum BaseFn : int { RELU = 0, GELU = 1, GELU_TANH = 2, SILU = 3 };

// Primitive operations for a float-like type T.  Specialise for new types.
// Required: exp, erf, relu (max(x, 0) keeping NaN), step ([x > 0] as 0/1), abs,
// where_nonneg(x, a, b) = (x >= 0 ? a : b) lane-wise.
template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  static FC_HD FC_INLINE float exp(float x) { return ::expf(x); }
  static FC_HD FC_INLINE float erf(float x) { return ::erff(x); }
  // `z < 0 ? 0 : z` keeps NaN (like torch.relu) and is branch-free after compilation.
  static FC_HD FC_INLINE float relu(float x) { return x < 0.0f ? 0.0f : x; }
  static FC_HD FC_INLINE float step(float x) { return x > 0.0f ? 1.0f : 0.0f; }
  static FC_HD FC_INLINE float abs(float x) { return ::fabsf(x); }
  static FC_HD FC_INLINE float where_nonneg(float x, float a, float b) { return x >= 0.0f ? a : b; }
};

template <>
struct MathOps<double> {
  static FC_HD FC_INLINE double exp(double x) { return ::exp(x); }
  static FC_HD FC_INLINE double erf(double x) { return ::erf(x); }
  static FC_HD FC_INLINE double relu(double x) { return x < 0.0 ? 0.0 : x; }
  static FC_HD FC_INLINE double step(double x) { return x > 0.0 ? 1.0 : 0.0; }
  static FC_HD FC_INLINE double abs(double x) { return ::fabs(x); }
  static FC_HD FC_INLINE double where_nonneg(double x, double a, double b) { return x >= 0.0 ? a : b; }
};

namespace detail {
// Constants in double; T(c) rounds them once to T's precision.
constexpr double kInvSqrt2 = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;

// s = sigmoid(x) and sc = 1 - s, both to full relative precision and without overflow:
// with t = exp(-|x|) in (0, 1] and r = 1 / (1 + t), (s, sc) = (r, t r) for x >= 0, else (t r, r).
// (Computing 1 - s by subtraction would lose all digits for large x, where f' needs them.)
template <typename T>
FC_HD FC_INLINE void sigmoid_pair(T x, T& s, T& sc) {
  using Ops = MathOps<T>;
  const T t = Ops::exp(T(0.0) - Ops::abs(x));
  const T r = T(1.0) / (T(1.0) + t);
  const T tr = t * r;
  s = Ops::where_nonneg(x, r, tr);
  sc = Ops::where_nonneg(x, tr, r);
}

// 2u for gelu_tanh, u = sqrt(2/pi) (z + 0.044715 z^3); 0.5 (1 + tanh(u)) = sigmoid(2u).
template <typename T>
FC_HD FC_INLINE T gelu_tanh_two_u(T z) {
  return T(2.0 * kSqrt2OverPi) * (z + T(kTanhCubic) * z * z * z);
}
}  // namespace detail

// f(z) for base function BASE.
template <int BASE, typename T>
FC_HD FC_INLINE T act_f(T z) {
  using Ops = MathOps<T>;
  if constexpr (BASE == RELU) {
    return Ops::relu(z);
  } else if constexpr (BASE == GELU) {
    return T(0.5) * z * (T(1.0) + Ops::erf(z * T(detail::kInvSqrt2)));
  } else if constexpr (BASE == GELU_TANH) {
    T s, sc;
    detail::sigmoid_pair(detail::gelu_tanh_two_u(z), s, sc);  // s = 0.5 (1 + t)
    return z * s;
  } else {
    static_assert(BASE == SILU, "unknown activation base id");
    T s, sc;
    detail::sigmoid_pair(z, s, sc);
    return z * s;
  }
}

// f(z) and f'(z) together (they share exp/erf evaluations).
template <int BASE, typename T>
FC_HD FC_INLINE void act_f_df(T z, T& f, T& df) {
  using Ops = MathOps<T>;
  if constexpr (BASE == RELU) {
    f = Ops::relu(z);
    df = Ops::step(z);
  } else if constexpr (BASE == GELU) {
    const T cdf = T(0.5) * (T(1.0) + Ops::erf(z * T(detail::kInvSqrt2)));
    const T pdf = T(detail::kInvSqrt2Pi) * Ops::exp(T(-0.5) * z * z);
    f = z * cdf;
    df = cdf + z * pdf;
  } else if constexpr (BASE == GELU_TANH) {
    T s, sc;
    detail::sigmoid_pair(detail::gelu_tanh_two_u(z), s, sc);  // s = 0.5 (1 + t), sc = 1 - s
    f = z * s;
    // 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3a z^2) with 1 - t^2 = 4 s (1 - s)
    df = s + T(2.0 * detail::kSqrt2OverPi) * z * s * sc * (T(1.0) + T(3.0 * detail::kTanhCubic) * z * z);
  } else {
    static_assert(BASE == SILU, "unknown activation base id");
    T s, sc;
    detail::sigmoid_pair(z, s, sc);
    f = z * s;
    df = s * (T(1.0) + z * sc);
  }
}

// Forward of one element: h = f(z) (ungated, u ignored) or h = f(g) u (gated, g = z).
template <int BASE, bool GATED, typename T>
FC_HD FC_INLINE T act_forward_point(T g, T u) {
  const T a = act_f<BASE>(g);
  if constexpr (GATED) {
    return a * u;
  } else {
    (void)u;
    return a;
  }
}

// Backward of one element.  Ungated: dg = dh f'(g), h = f(g) (du untouched).
// Gated: dg = dh u f'(g), du = dh f(g), h = f(g) u.
template <int BASE, bool GATED, typename T>
FC_HD FC_INLINE void act_backward_point(T g, T u, T dh, T& dg, T& du, T& h) {
  T a, da;
  act_f_df<BASE>(g, a, da);
  if constexpr (GATED) {
    dg = dh * u * da;
    du = dh * a;
    h = a * u;
  } else {
    (void)u;
    (void)du;
    dg = dh * da;
    h = a;
  }
}

}  // namespace fused_ckpt
