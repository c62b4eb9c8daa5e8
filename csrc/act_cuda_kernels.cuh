// CUDA kernels for fused_ckpt_ext::act_forward / act_backward (arithmetic only; launch and
// validation live in act_cuda.cu).  The math comes from activations.h, computed in fp32.
//
// One kernel serves both directions (BWD=false: forward, writes h; BWD=true: backward, writes
// dz and, when NEED_H, h).  Memory is accessed in units of V elements: V = 16 / sizeof(scalar_t)
// (4 floats, 8 halves/bf16) gives one 16-byte load/store per tensor per unit; V = 1 is the
// fallback for unaligned pointers or gated widths f % V != 0.  Grid-stride loop over units,
// 64-bit indices throughout.
//
// Pointers and shapes (all row-major contiguous):
//   z  [M, F1]  F1 = f (ungated) or 2f (gated: columns [0, f) gate g, [f, 2f) up u)
//   dh [M, f]   (BWD only)
//   dz [M, F1]  (BWD only)
//   h  [M, f]   (written when NEED_H; forward always sets NEED_H)
#pragma once

#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "activations.h"

namespace fused_ckpt {
namespace cuda {

constexpr int kThreads = 256;  // 8 warps: a full-occupancy block size on sm_80/sm_90.

template <typename scalar_t>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16 bytes

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

template <typename scalar_t, int W>
__device__ __forceinline__ void load_float(const scalar_t* __restrict__ p, float (&out)[W]) {
  const Pack<scalar_t, W> pk = *reinterpret_cast<const Pack<scalar_t, W>*>(p);
#pragma unroll
  for (int k = 0; k < W; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <typename scalar_t, int W>
__device__ __forceinline__ void store_float(scalar_t* __restrict__ p, const float (&in)[W]) {
  Pack<scalar_t, W> pk;
#pragma unroll
  for (int k = 0; k < W; ++k) pk.v[k] = static_cast<scalar_t>(in[k]);
  *reinterpret_cast<Pack<scalar_t, W>*>(p) = pk;
}

// W consecutive elements: z at zoff (and u at zoff + f), dh/h at hoff.
template <typename scalar_t, int BASE, bool GATED, bool BWD, bool NEED_H, int W>
__device__ __forceinline__ void act_unit(const scalar_t* __restrict__ z,
                                         const scalar_t* __restrict__ dh, scalar_t* __restrict__ dz,
                                         scalar_t* __restrict__ h, int64_t f, int64_t zoff,
                                         int64_t hoff) {
  float g[W], u[W], d[W];
  load_float<scalar_t, W>(z + zoff, g);
  if constexpr (GATED) load_float<scalar_t, W>(z + zoff + f, u);
  if constexpr (BWD) load_float<scalar_t, W>(dh + hoff, d);
  float og[W], ou[W], oh[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float uk = GATED ? u[k] : 0.0f;
    if constexpr (BWD) {
      act_backward_point<BASE, GATED>(g[k], uk, d[k], og[k], ou[k], oh[k]);
    } else {
      oh[k] = act_forward_point<BASE, GATED>(g[k], uk);
    }
  }
  if constexpr (BWD) {
    store_float<scalar_t, W>(dz + zoff, og);
    if constexpr (GATED) store_float<scalar_t, W>(dz + zoff + f, ou);
  }
  if constexpr (NEED_H) store_float<scalar_t, W>(h + hoff, oh);
}

// V > 1 requires every pointer 16-byte aligned and, when GATED, f % V == 0 (the launcher checks).
template <typename scalar_t, int BASE, bool GATED, bool BWD, bool NEED_H, int V>
__global__ void __launch_bounds__(kThreads)
    act_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ dh,
               scalar_t* __restrict__ dz, scalar_t* __restrict__ h, int64_t M, int64_t f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (GATED) {
    const int64_t units_per_row = f / V;
    const int64_t n_units = M * units_per_row;
    for (int64_t i = tid; i < n_units; i += stride) {
      const int64_t r = i / units_per_row;
      const int64_t c = (i - r * units_per_row) * V;
      act_unit<scalar_t, BASE, true, BWD, NEED_H, V>(z, dh, dz, h, f, r * 2 * f + c, r * f + c);
    }
  } else {
    const int64_t n = M * f;
    const int64_t n_units = n / V;
    for (int64_t i = tid; i < n_units; i += stride) {
      act_unit<scalar_t, BASE, false, BWD, NEED_H, V>(z, dh, dz, h, f, i * V, i * V);
    }
    if constexpr (V > 1) {  // scalar tail: the last n % V elements
      for (int64_t k = n_units * V + tid; k < n; k += stride) {
        act_unit<scalar_t, BASE, false, BWD, NEED_H, 1>(z, dh, dz, h, f, k, k);
      }
    }
  }
}

}  // namespace cuda
}  // namespace fused_ckpt
