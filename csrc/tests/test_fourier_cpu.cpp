// ctest: the CPU kernel of perceiver_fast::fourier_encode against the formula
// evaluated in double here, and its argument checks (errors, not crashes).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                        \
  do {                                                           \
    if (!(cond)) {                                               \
      ++failures;                                                \
      std::fprintf(stderr, "FAILED %s:%d: %s\n  ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
    }                                                            \
  } while (0)

at::Tensor fourier_encode(const at::Tensor& inputs, std::vector<int64_t> dims, std::vector<double> res,
                          int64_t bands, bool concat_pos, bool sine_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("perceiver_fast::fourier_encode", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::ArrayRef<double>, int64_t,
                                         bool, bool)>();
  return op.call(inputs, dims, res, bands, concat_pos, sine_only);
}

double lin(double a, double b, int64_t n, int64_t i) { return n == 1 ? a : a + (b - a) * double(i) / double(n - 1); }

void check_case(const std::vector<int64_t>& dims, std::vector<double> res, int64_t K, bool concat_pos,
                bool sine_only, int64_t B, int64_t Cin, at::ScalarType dtype, double atol) {
  const int64_t D = static_cast<int64_t>(dims.size());
  int64_t P = 1;
  for (int64_t n : dims) P *= n;
  at::Tensor in = at::randn({B, P, Cin}).to(dtype);
  at::Tensor out = fourier_encode(in, dims, res, K, concat_pos, sine_only).to(at::kDouble);
  const int64_t C = (concat_pos ? D : 0) + D * K * (sine_only ? 1 : 2);
  EXPECT(out.size(0) == B && out.size(1) == P && out.size(2) == Cin + C, "bad shape");
  if (out.size(2) != Cin + C) return;
  EXPECT(at::equal(out.narrow(2, 0, Cin), in.to(at::kDouble)), "input channels not copied");
  const auto o = out.accessor<double, 3>();
  double max_err = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = 0; p < P; ++p) {
      std::vector<int64_t> idx(D);
      int64_t rem = p;
      for (int64_t d = D - 1; d >= 0; --d) {
        idx[d] = rem % dims[d];
        rem /= dims[d];
      }
      int64_t c = Cin;
      std::vector<double> expect;
      if (concat_pos)
        for (int64_t d = 0; d < D; ++d) expect.push_back(lin(-1, 1, dims[d], idx[d]));
      for (int phase = 0; phase < (sine_only ? 1 : 2); ++phase)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t k = 0; k < K; ++k) {
            const double r = res.empty() ? double(dims[d]) : res[d];
            const double arg = M_PI * lin(1.0, r / 2.0, K, k) * lin(-1, 1, dims[d], idx[d]);
            expect.push_back(phase == 0 ? std::sin(arg) : std::cos(arg));
          }
      for (double e : expect) max_err = std::max(max_err, std::abs(o[b][p][c++] - e));
    }
  }
  EXPECT(max_err <= atol, "max |error| %.3g > %.3g (D=%lld K=%lld dtype=%s)", max_err, atol, (long long)D,
         (long long)K, c10::toString(dtype));
}

void expect_throws(const std::string& what, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(what) != std::string::npos, "error \"%s\" does not mention \"%s\"", msg.c_str(), what.c_str());
    return;
  }
  EXPECT(false, "no error raised; expected one mentioning \"%s\"", what.c_str());
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (bool concat_pos : {true, false}) {
    for (bool sine_only : {false, true}) {
      check_case({7}, {}, 1, concat_pos, sine_only, 2, 3, at::kFloat, 2e-7);
      check_case({5, 8}, {}, 4, concat_pos, sine_only, 3, 2, at::kFloat, 2e-7);
      check_case({3, 16, 16}, {16, 224, 224}, 6, concat_pos, sine_only, 1, 0, at::kFloat, 2e-7);
      check_case({37, 29}, {}, 64, concat_pos, sine_only, 3, 5, at::kFloat, 2e-7);
      check_case({9, 4}, {30, 10}, 5, concat_pos, sine_only, 2, 1, at::kDouble, 1e-12);
      check_case({6, 5}, {}, 3, concat_pos, sine_only, 2, 3, at::kHalf, 1e-3);
      check_case({6, 5}, {}, 3, concat_pos, sine_only, 2, 3, at::kBFloat16, 8e-3);
    }
  }
  check_case({224, 224}, {}, 64, true, false, 1, 3, at::kFloat, 2e-7);
  EXPECT(fourier_encode(at::zeros({0, 12, 3}), {3, 4}, {}, 2, true, false).sizes() == at::IntArrayRef({0, 12, 3 + 10}),
         "empty batch");

  const at::Tensor x = at::zeros({2, 12, 3});
  expect_throws("num_bands must be >= 1", [&] { fourier_encode(x, {3, 4}, {}, 0, true, false); });
  expect_throws("prod(index_dims", [&] { fourier_encode(x, {3, 5}, {}, 4, true, false); });
  expect_throws("index_dims must have 1 to 8", [&] { fourier_encode(x, {}, {}, 4, true, false); });
  expect_throws("index_dims must be positive", [&] { fourier_encode(x, {-3, -4}, {}, 4, true, false); });
  expect_throws("index_dims must be positive", [&] { fourier_encode(x, {0, 12}, {}, 4, true, false); });
  expect_throws("max_resolution has 1 entries", [&] { fourier_encode(x, {3, 4}, {1.0}, 4, true, false); });
  expect_throws("must be 3-D", [&] { fourier_encode(at::zeros({12, 3}), {3, 4}, {}, 4, true, false); });
  expect_throws("floating-point", [&] { fourier_encode(x.to(at::kInt), {3, 4}, {}, 4, true, false); });
  expect_throws("overflows", [&] { fourier_encode(at::zeros({2, 1, 3}), {1LL << 40, 1LL << 40}, {}, 4, true, false); });

  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_fourier_cpu: all checks passed\n");
  return 0;
}
