// Fourier-feature position encoding: argument checking and the channel
// layout shared by the CPU and CUDA kernels.
//
// out[b, p, :] = [inputs[b, p, :Cin] | x_1..x_D (if concat_pos)
//                 | sin(pi f_{1,k} x_1) k=1..K | ... axis D
//                 | cos(...) same order (unless sine_only)]
// with x_d = linspace(-1, 1, n_d)[i_d] (p = row-major flattening of (i_1..i_D))
// and f_{d,k} = linspace(1, max_resolution_d / 2, K)[k].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <vector>

namespace perceiver_fast {

constexpr int64_t kMaxIndexDims = 8;

struct FourierGeometry {
  int64_t batch = 0;      // B
  int64_t positions = 0;  // P = prod(index_dims)
  int64_t in_channels = 0;  // Cin
  int64_t num_dims = 0;   // D
  int64_t num_bands = 0;  // K
  int64_t feat_channels = 0;  // C
  int64_t out_channels = 0;   // Cin + C
  int64_t pos_offset = 0;  // first position channel inside the features
  int64_t sin_offset = 0;
  int64_t cos_offset = 0;  // only meaningful when !sine_only
  bool concat_pos = true;
  bool sine_only = false;
  std::vector<int64_t> index_dims;
  std::vector<double> max_resolution;  // defaults to index_dims when empty
};

inline int64_t fourier_feature_channels(int64_t num_dims, int64_t num_bands, bool concat_pos,
                                        bool sine_only) {
  return (concat_pos ? num_dims : 0) + num_dims * num_bands * (sine_only ? 1 : 2);
}

// Validates the op's arguments (the Python wrapper checks them first with
// friendlier messages; this keeps direct torch.ops callers from crashing).
inline FourierGeometry check_fourier_args(const at::Tensor& inputs, c10::IntArrayRef index_dims,
                                          c10::ArrayRef<double> max_resolution, int64_t num_bands,
                                          bool concat_pos, bool sine_only) {
  TORCH_CHECK(inputs.dim() == 3,
              "perceiver_fast::fourier_encode: inputs must be 3-D (batch, positions, channels), got ",
              inputs.dim(), "-D with shape ", inputs.sizes());
  TORCH_CHECK(at::isFloatingType(inputs.scalar_type()),
              "perceiver_fast::fourier_encode: inputs must be a floating-point tensor (float32, "
              "float64, float16 or bfloat16), got ",
              inputs.scalar_type());
  TORCH_CHECK(num_bands >= 1, "perceiver_fast::fourier_encode: num_bands must be >= 1, got ",
              num_bands);
  TORCH_CHECK(!index_dims.empty() && static_cast<int64_t>(index_dims.size()) <= kMaxIndexDims,
              "perceiver_fast::fourier_encode: index_dims must have 1 to ", kMaxIndexDims,
              " entries, got ", index_dims);
  TORCH_CHECK(max_resolution.empty() || max_resolution.size() == index_dims.size(),
              "perceiver_fast::fourier_encode: max_resolution has ", max_resolution.size(),
              " entries but index_dims ", index_dims, " has ", index_dims.size());

  FourierGeometry g;
  g.num_dims = static_cast<int64_t>(index_dims.size());
  g.num_bands = num_bands;
  g.concat_pos = concat_pos;
  g.sine_only = sine_only;
  int64_t positions = 1;
  for (int64_t n : index_dims) {
    TORCH_CHECK(n > 0, "perceiver_fast::fourier_encode: index_dims must be positive, got ",
                index_dims);
    TORCH_CHECK(!c10::mul_overflows(positions, n, &positions),
                "perceiver_fast::fourier_encode: prod(index_dims) overflows int64: ", index_dims);
    g.index_dims.push_back(n);
  }
  for (size_t d = 0; d < index_dims.size(); ++d) {
    g.max_resolution.push_back(max_resolution.empty() ? static_cast<double>(index_dims[d])
                                                      : max_resolution[d]);
  }
  g.positions = positions;
  g.batch = inputs.size(0);
  g.in_channels = inputs.size(2);
  TORCH_CHECK(inputs.size(1) == positions, "perceiver_fast::fourier_encode: inputs has ",
              inputs.size(1), " positions (shape ", inputs.sizes(), ") but prod(index_dims ",
              index_dims, ") = ", positions);
  TORCH_CHECK(num_bands <= (int64_t{1} << 24),
              "perceiver_fast::fourier_encode: num_bands is unreasonably large: ", num_bands);
  g.feat_channels = fourier_feature_channels(g.num_dims, num_bands, concat_pos, sine_only);
  g.out_channels = g.in_channels + g.feat_channels;
  int64_t rows = 0, numel = 0;
  TORCH_CHECK(!c10::mul_overflows(g.batch, positions, &rows) &&
                  !c10::mul_overflows(rows, g.out_channels, &numel),
              "perceiver_fast::fourier_encode: output size overflows int64");
  g.pos_offset = 0;
  g.sin_offset = concat_pos ? g.num_dims : 0;
  g.cos_offset = g.sin_offset + g.num_dims * num_bands;
  return g;
}

}  // namespace perceiver_fast
