// CUDA implementations of fused_ckpt_ext::act_forward / act_backward: validation, allocation,
// launch configuration.  Kernels are in act_cuda_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "act_common.h"
#include "act_cuda_kernels.cuh"

namespace fused_ckpt {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;
// Grid-stride blocks per SM: 8 blocks x 256 threads fill an SM (2048 threads on sm_80/sm_90).
constexpr int kBlocksPerSm = 8;

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];  // zero-initialised (static storage)
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Launches act_kernel; picks 16-byte units when pointers and widths allow.
template <typename scalar_t, int BASE, bool GATED, bool BWD, bool NEED_H>
void launch(const scalar_t* z, const scalar_t* dh, scalar_t* dz, scalar_t* h, int64_t M,
            int64_t f, int device) {
  constexpr int V = kVecWidth<scalar_t>;
  bool vec = aligned16(z) && (!BWD || (aligned16(dh) && aligned16(dz))) && (!NEED_H || aligned16(h));
  if (GATED) vec = vec && (f % V == 0);
  const int64_t work = vec ? std::max<int64_t>((M * f) / V, 1) : M * f;
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * kBlocksPerSm;
  const int blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (vec) {
    act_kernel<scalar_t, BASE, GATED, BWD, NEED_H, V><<<blocks, kThreads, 0, stream>>>(z, dh, dz, h, M, f);
  } else {
    act_kernel<scalar_t, BASE, GATED, BWD, NEED_H, 1><<<blocks, kThreads, 0, stream>>>(z, dh, dz, h, M, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FC_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor act_forward_cuda(const at::Tensor& z_in, c10::string_view activation) {
  const ActSpec spec = parse_activation(activation);
  const int64_t f = check_inputs(z_in, nullptr, spec, activation, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const int64_t M = z.size(0);
  at::Tensor h = at::empty({M, f}, z.options());
  if (h.numel() == 0) return h;
  const int device = z.get_device();

  FC_DISPATCH_CUDA_TYPES(z.scalar_type(), "act_forward_cuda", [&] {
    dispatch_activation(spec, [&](auto base_c, auto gated_c) {
      constexpr int BASE = decltype(base_c)::value;
      constexpr bool GATED = decltype(gated_c)::value;
      launch<scalar_t, BASE, GATED, /*BWD=*/false, /*NEED_H=*/true>(
          z.const_data_ptr<scalar_t>(), nullptr, nullptr, h.mutable_data_ptr<scalar_t>(), M, f, device);
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> act_backward_cuda(const at::Tensor& z_in, const at::Tensor& dh_in,
                                                     c10::string_view activation, bool need_h) {
  const ActSpec spec = parse_activation(activation);
  const int64_t f = check_inputs(z_in, &dh_in, spec, activation, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const at::Tensor dh = dh_in.contiguous();
  const int64_t M = z.size(0);
  at::Tensor dz = at::empty({M, z.size(1)}, z.options());
  at::Tensor h = need_h ? at::empty({M, f}, z.options()) : at::empty({0}, z.options());
  if (dz.numel() == 0) return {dz, h};
  const int device = z.get_device();

  FC_DISPATCH_CUDA_TYPES(z.scalar_type(), "act_backward_cuda", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
    scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
    dispatch_activation(spec, [&](auto base_c, auto gated_c) {
      constexpr int BASE = decltype(base_c)::value;
      constexpr bool GATED = decltype(gated_c)::value;
      if (need_h) {
        launch<scalar_t, BASE, GATED, true, true>(zp, dhp, dzp, h.mutable_data_ptr<scalar_t>(), M, f, device);
      } else {
        launch<scalar_t, BASE, GATED, true, false>(zp, dhp, dzp, nullptr, M, f, device);
      }
    });
  });
  return {dz, h};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_ckpt

TORCH_LIBRARY_IMPL(fused_ckpt_ext, CUDA, m) {
  m.impl("act_forward", &fused_ckpt::cuda::act_forward_cuda);
  m.impl("act_backward", &fused_ckpt::cuda::act_backward_cuda);
}
