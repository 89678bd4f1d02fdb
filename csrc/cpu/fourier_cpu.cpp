// CPU kernel of perceiver_fast::fourier_encode.
//
// sin(pi f_{d,k} x_d) depends only on (axis d, band k, index i_d along axis d),
// so the features are built from small per-axis tables (n_d x K sines and
// cosines, computed in double and rounded once to the output dtype). Each
// output row is then a gather of table rows: the op only writes its output,
// once, with plain memcpy's (SIMD in libc), parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../fourier.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

namespace perceiver_fast {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Rounds a double to the output dtype once (via float for the 16-bit types,
// which is what "compute in float32 and round once" gives).
template <typename scalar_t>
inline scalar_t round_to(double v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return static_cast<scalar_t>(static_cast<float>(v));
  }
}

// Large outputs (hundreds of MB for a batch of 224x224 images) are allocated
// 2 MiB-aligned and advised to use transparent huge pages: otherwise the
// first-touch page faults of the fresh allocation cost more than the kernel
// itself. This is what torch's own CPU allocator does under
// THP_MEM_ALLOC_ENABLE=1, applied to this op's output only.
class HugePageAllocator final : public at::Allocator {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;

  at::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    if (nbytes > 0) {
      const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      const int err = posix_memalign(&ptr, kHugePage, size);
      TORCH_CHECK(err == 0 && ptr != nullptr, "perceiver_fast::fourier_encode: out of memory allocating ",
                  nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(ptr, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    }
    return {ptr, ptr, &release, at::Device(at::DeviceType::CPU)};
  }
  at::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

 private:
  static void release(void* ptr) { std::free(ptr); }
};

at::Tensor empty_output(c10::IntArrayRef sizes, at::ScalarType dtype) {
  // Below glibc's largest mmap threshold (32 MiB), freed blocks are reused
  // from the heap without new page faults: keep torch's allocator there.
  constexpr int64_t kHugeThresholdBytes = int64_t{32} << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(c10::elementSize(dtype)) < kHugeThresholdBytes) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  }
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

template <typename scalar_t>
struct AxisTables {
  std::vector<scalar_t> pos;  // n_d
  std::vector<scalar_t> sin;  // n_d x K
  std::vector<scalar_t> cos;  // n_d x K (empty when sine_only)
};

template <typename scalar_t>
std::vector<AxisTables<scalar_t>> build_tables(const FourierGeometry& g) {
  const int64_t K = g.num_bands;
  // Positions are written exactly as torch.linspace builds them (in float32
  // for the 32/16-bit dtypes, like HF); sin/cos use float64 positions and
  // frequencies, so they are accurate to the output dtype's rounding.
  const auto pos_dtype = std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat;
  std::vector<AxisTables<scalar_t>> tables(g.num_dims);
  for (int64_t d = 0; d < g.num_dims; ++d) {
    const int64_t n = g.index_dims[d];
    auto& t = tables[d];
    at::Tensor pos = at::linspace(-1.0, 1.0, n, at::TensorOptions().dtype(pos_dtype)).to(at::kDouble);
    at::Tensor x = at::linspace(-1.0, 1.0, n, at::TensorOptions().dtype(at::kDouble));
    at::Tensor f = at::linspace(1.0, g.max_resolution[d] / 2.0, K, at::TensorOptions().dtype(at::kDouble));
    const double* pos_p = pos.const_data_ptr<double>();
    const double* x_p = x.const_data_ptr<double>();
    const double* f_p = f.const_data_ptr<double>();
    t.pos.resize(n);
    t.sin.resize(n * K);
    if (!g.sine_only) t.cos.resize(n * K);
    for (int64_t i = 0; i < n; ++i) {
      t.pos[i] = round_to<scalar_t>(pos_p[i]);
      for (int64_t k = 0; k < K; ++k) {
        const double arg = kPi * (x_p[i] * f_p[k]);
        t.sin[i * K + k] = round_to<scalar_t>(std::sin(arg));
        if (!g.sine_only) t.cos[i * K + k] = round_to<scalar_t>(std::cos(arg));
      }
    }
  }
  return tables;
}

// Copies `bytes` from an L1-resident staging buffer to the output with
// non-temporal (streaming) stores where the target is 16-byte aligned: the
// output is far larger than the caches and is not read back here, so this
// saves the read-for-ownership of every output cache line. SSE2 is part of
// the x86-64 baseline, so this needs no -march flag.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
  if (head > bytes) head = bytes;
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; d += 64, s += 64, bytes -= 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
  }
  for (; bytes >= 16; d += 16, s += 16, bytes -= 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename scalar_t>
void encode_rows(const FourierGeometry& g, const scalar_t* in, scalar_t* out) {
  const auto tables = build_tables<scalar_t>(g);
  const int64_t D = g.num_dims, K = g.num_bands, P = g.positions;
  const int64_t Cin = g.in_channels, W = g.out_channels;
  const int64_t rows = g.batch * P;
  // Rows are assembled in a small staging buffer (L1/L2-resident), then
  // streamed to the output in one contiguous copy.
  constexpr int64_t kStageBytes = 16 * 1024;
  const int64_t stage_rows = std::max<int64_t>(1, kStageBytes / (W * int64_t(sizeof(scalar_t))));
  const int64_t grain = std::max<int64_t>(stage_rows, (1 << 20) / (W * int64_t(sizeof(scalar_t))));
  // Streaming stores only pay off for outputs much larger than the caches;
  // a small output is better left in cache for whoever reads it next.
  const bool streaming = rows * W * int64_t(sizeof(scalar_t)) >= (int64_t{8} << 20);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> stage(stage_rows * W);
    int64_t idx[kMaxIndexDims];
    int64_t rem = begin % P;
    for (int64_t d = D - 1; d >= 0; --d) {
      idx[d] = rem % g.index_dims[d];
      rem /= g.index_dims[d];
    }
    for (int64_t r0 = begin; r0 < end; r0 += stage_rows) {
      const int64_t n = std::min(stage_rows, end - r0);
      scalar_t* o = stage.data();
      for (int64_t r = r0; r < r0 + n; ++r) {
        if (Cin > 0) {
          std::memcpy(o, in + r * Cin, sizeof(scalar_t) * Cin);
          o += Cin;
        }
        if (g.concat_pos) {
          for (int64_t d = 0; d < D; ++d) *o++ = tables[d].pos[idx[d]];
        }
        for (int64_t d = 0; d < D; ++d, o += K) {
          std::memcpy(o, tables[d].sin.data() + idx[d] * K, sizeof(scalar_t) * K);
        }
        if (!g.sine_only) {
          for (int64_t d = 0; d < D; ++d, o += K) {
            std::memcpy(o, tables[d].cos.data() + idx[d] * K, sizeof(scalar_t) * K);
          }
        }
        // Next grid index (row-major, wrapping to the next batch element).
        for (int64_t d = D - 1; d >= 0; --d) {
          if (++idx[d] < g.index_dims[d]) break;
          idx[d] = 0;
        }
      }
      if (streaming) {
        stream_copy(out + r0 * W, stage.data(), sizeof(scalar_t) * n * W);
      } else {
        std::memcpy(out + r0 * W, stage.data(), sizeof(scalar_t) * n * W);
      }
    }
    if (streaming) stream_fence();
  });
}

at::Tensor fourier_encode_cpu(const at::Tensor& inputs, c10::IntArrayRef index_dims,
                              c10::ArrayRef<double> max_resolution, int64_t num_bands,
                              bool concat_pos, bool sine_only) {
  TORCH_CHECK(inputs.device().is_cpu(), "perceiver_fast::fourier_encode (CPU kernel): inputs on ",
              inputs.device());
  const FourierGeometry g =
      check_fourier_args(inputs, index_dims, max_resolution, num_bands, concat_pos, sine_only);
  const at::Tensor in = inputs.contiguous();
  at::Tensor out = empty_output({g.batch, g.positions, g.out_channels}, in.scalar_type());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "fourier_encode_cpu",
                                  [&] {
                                    encode_rows<scalar_t>(g, in.const_data_ptr<scalar_t>(),
                                                          out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(perceiver_fast, CPU, m) {
  m.impl("fourier_encode", &fourier_encode_cpu);
}

}  // namespace perceiver_fast
