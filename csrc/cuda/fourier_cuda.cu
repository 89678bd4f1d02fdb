// CUDA kernel of perceiver_fast::fourier_encode: one pass over the output.
//
// Each thread block owns R consecutive grid positions. It first computes
// their R x C feature rows into shared memory (sin/cos in float64 with
// sincospi, i.e. exact range reduction: arguments reach pi*112 at 224 px,
// where fast-math __sinf is off by far more than fp32 rounding; rounded once
// to the output dtype). Then, for each batch element it owns, it writes the
// contiguous output chunk out[b, p0:p0+R, :] = [inputs | features] with
// 16-byte vector stores, so consecutive threads store consecutive 16 bytes.
// The features are computed once per position and reused for every batch
// element; nothing but the output is written to global memory.
//
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h pulls in cusparse.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../fourier.h"

namespace perceiver_fast {
namespace {

struct Params {
  int64_t index_dims[kMaxIndexDims];
  int64_t strides[kMaxIndexDims];  // row-major strides of the grid
  double max_resolution[kMaxIndexDims];
  int64_t batch, positions;
  int num_dims, num_bands;
  int in_channels, feat_channels, out_channels;
  int sin_offset, cos_offset;
  bool concat_pos, sine_only;
};

// torch.linspace(start, end, n)[i], as torch's CUDA kernel computes it.
template <typename T>
__device__ __forceinline__ T linspace_at(T start, T end, int64_t n, int64_t i) {
  if (n == 1) return start;
  const T step = (end - start) / static_cast<T>(n - 1);
  return i < n / 2 ? start + step * static_cast<T>(i) : end - step * static_cast<T>(n - 1 - i);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t round_to(double v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return static_cast<scalar_t>(static_cast<float>(v));
  }
}

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fourier_encode_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, Params prm,
                          int rows_per_block, int batches_per_block) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* feats = reinterpret_cast<scalar_t*>(smem_raw);  // R x C

  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int R = static_cast<int>(min(static_cast<int64_t>(rows_per_block), prm.positions - p0));
  const int C = prm.feat_channels, K = prm.num_bands, D = prm.num_dims;
  const int DK = D * K;

  // Phase 1: feature rows of this block's positions, into shared memory.
  for (int t = threadIdx.x; t < R * DK; t += blockDim.x) {
    const int r = t / DK;
    const int j = t - r * DK;
    const int d = j / K;
    const int k = j - d * K;
    const int64_t n = prm.index_dims[d];
    const int64_t i = ((p0 + r) / prm.strides[d]) % n;
    const double x = linspace_at<double>(-1.0, 1.0, n, i);
    const double f = linspace_at<double>(1.0, prm.max_resolution[d] / 2.0, K, k);
    double s, c;
    sincospi(x * f, &s, &c);
    feats[r * C + prm.sin_offset + j] = round_to<scalar_t>(s);
    if (!prm.sine_only) feats[r * C + prm.cos_offset + j] = round_to<scalar_t>(c);
  }
  if (prm.concat_pos) {
    for (int t = threadIdx.x; t < R * D; t += blockDim.x) {
      const int r = t / D;
      const int d = t - r * D;
      const int64_t n = prm.index_dims[d];
      const int64_t i = ((p0 + r) / prm.strides[d]) % n;
      // Positions exactly as torch.linspace gives them (float32, like HF,
      // except for float64 outputs).
      if constexpr (std::is_same_v<scalar_t, double>) {
        feats[r * C + d] = linspace_at<double>(-1.0, 1.0, n, i);
      } else {
        feats[r * C + d] = static_cast<scalar_t>(linspace_at<float>(-1.0f, 1.0f, n, i));
      }
    }
  }
  __syncthreads();

  // Phase 2: stream [inputs | features] rows to out[b, p0:p0+R, :].
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int W = prm.out_channels, Cin = prm.in_channels;
  const int n = R * W;  // elements of one contiguous output chunk (< 2^31, checked on the host)
  const int64_t b_end = min(prm.batch, static_cast<int64_t>(blockIdx.y + 1) * batches_per_block);
  for (int64_t b = static_cast<int64_t>(blockIdx.y) * batches_per_block; b < b_end; ++b) {
    const int64_t row0 = b * prm.positions + p0;
    scalar_t* dst = out + row0 * W;
    const scalar_t* src = in + row0 * Cin;
    auto value = [&](int r, int c) -> scalar_t {
      return c < Cin ? src[r * Cin + c] : feats[r * C + (c - Cin)];
    };
    const int misalign = static_cast<int>((reinterpret_cast<uintptr_t>(dst) & 15) / sizeof(scalar_t));
    const int head = min(n, misalign == 0 ? 0 : VEC - misalign);
    for (int e = threadIdx.x; e < head; e += blockDim.x) {
      const int r = e / W;
      dst[e] = value(r, e - r * W);
    }
    const int nvec = (n - head) / VEC;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int e0 = head + v * VEC;
      int r = e0 / W;
      int c = e0 - r * W;
      alignas(16) scalar_t vals[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        vals[u] = value(r, c);
        if (++c == W) {
          c = 0;
          ++r;
        }
      }
      *reinterpret_cast<uint4*>(dst + e0) = *reinterpret_cast<const uint4*>(vals);
    }
    for (int e = head + nvec * VEC + threadIdx.x; e < n; e += blockDim.x) {
      const int r = e / W;
      dst[e] = value(r, e - r * W);
    }
  }
}

at::Tensor fourier_encode_cuda(const at::Tensor& inputs, c10::IntArrayRef index_dims,
                               c10::ArrayRef<double> max_resolution, int64_t num_bands,
                               bool concat_pos, bool sine_only) {
  TORCH_CHECK(inputs.is_cuda(), "perceiver_fast::fourier_encode (CUDA kernel): inputs on ",
              inputs.device());
  const FourierGeometry g =
      check_fourier_args(inputs, index_dims, max_resolution, num_bands, concat_pos, sine_only);
  c10::cuda::CUDAGuard guard(inputs.device());
  const at::Tensor in = inputs.contiguous();
  at::Tensor out = at::empty({g.batch, g.positions, g.out_channels}, in.options());
  if (out.numel() == 0) return out;

  TORCH_CHECK(g.out_channels < (int64_t{1} << 24) && g.num_dims * g.num_bands < (int64_t{1} << 24),
              "perceiver_fast::fourier_encode (CUDA): too many channels (", g.out_channels, ")");
  Params prm{};
  int64_t stride = 1;
  for (int64_t d = g.num_dims - 1; d >= 0; --d) {
    prm.index_dims[d] = g.index_dims[d];
    prm.strides[d] = stride;
    prm.max_resolution[d] = g.max_resolution[d];
    stride *= g.index_dims[d];
  }
  prm.batch = g.batch;
  prm.positions = g.positions;
  prm.num_dims = static_cast<int>(g.num_dims);
  prm.num_bands = static_cast<int>(g.num_bands);
  prm.in_channels = static_cast<int>(g.in_channels);
  prm.feat_channels = static_cast<int>(g.feat_channels);
  prm.out_channels = static_cast<int>(g.out_channels);
  prm.sin_offset = static_cast<int>(g.sin_offset);
  prm.cos_offset = static_cast<int>(g.cos_offset);
  prm.concat_pos = concat_pos;
  prm.sine_only = sine_only;

  const int64_t elem = static_cast<int64_t>(in.element_size());
  const int64_t row_bytes = g.feat_channels * elem;
  constexpr int64_t kMaxSmem = 48 * 1024, kTargetSmem = 16 * 1024;
  TORCH_CHECK(row_bytes <= kMaxSmem, "perceiver_fast::fourier_encode (CUDA): one row of ",
              g.feat_channels, " feature channels (", row_bytes,
              " bytes) exceeds the 48 KiB of shared memory the kernel uses; reduce num_bands");
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>(32, kTargetSmem / std::max<int64_t>(row_bytes, 1)));
  rows = std::min<int64_t>(rows, g.positions);
  while (rows > 1 && rows * g.out_channels >= (int64_t{1} << 31)) rows /= 2;
  TORCH_CHECK(rows * g.out_channels < (int64_t{1} << 31),
              "perceiver_fast::fourier_encode (CUDA): output rows too wide");
  const int64_t blocks_x = (g.positions + rows - 1) / rows;
  TORCH_CHECK(blocks_x < (int64_t{1} << 31), "perceiver_fast::fourier_encode (CUDA): too many positions");
  // Enough blocks to fill the GPU; beyond that, a block loops over batch
  // elements so that its feature rows are computed once and reused.
  constexpr int64_t kTargetBlocks = 2048;
  int64_t batch_chunks = std::min<int64_t>(g.batch, std::max<int64_t>(1, (kTargetBlocks + blocks_x - 1) / blocks_x));
  batch_chunks = std::min<int64_t>(batch_chunks, 65535);
  const int64_t per_block = (g.batch + batch_chunks - 1) / batch_chunks;
  const int64_t blocks_y = (g.batch + per_block - 1) / per_block;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  const size_t smem = static_cast<size_t>(rows * row_bytes);
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "fourier_encode_cuda", [&] {
    fourier_encode_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), prm, static_cast<int>(rows),
        static_cast<int>(per_block));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(perceiver_fast, CUDA, m) {
  m.impl("fourier_encode", &fourier_encode_cuda);
}

}  // namespace perceiver_fast
