// C++ test of catdpo::segment_reduce (CPU), run by ctest: the op against a naive
// double loop, through the dispatcher, its Meta kernel, determinism and checks.
// Exits non-zero on the first failure; independent of NDEBUG.
#include "segment_reduce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define EXPECT_OR_DIE(cond, ...)                                               \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

namespace {

std::mt19937_64 rng(12345);

at::Tensor random_values(int64_t n, int64_t k) {
  std::normal_distribution<float> normal(0.f, 3.f);
  at::Tensor t = at::empty({n, k}, at::kFloat);
  float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < n * k; ++i) p[i] = normal(rng);
  return t;
}

// Mostly valid ids, some -1, some out of range in both directions.
at::Tensor random_ids(int64_t n, int64_t num_segments) {
  std::uniform_int_distribution<int64_t> pick(0, std::max<int64_t>(0, num_segments - 1));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int64_t bad[] = {-2, -100, num_segments, num_segments + 3, int64_t{1} << 40};
  at::Tensor t = at::empty({n}, at::kLong);
  int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const double r = u(rng);
    if (r < 0.2 || num_segments == 0) {
      p[i] = -1;
    } else if (r > 0.95) {
      p[i] = bad[i % 5];
    } else {
      p[i] = pick(rng);
    }
  }
  return t;
}

at::Tensor random_multi_hot(int64_t n, int64_t num_segments) {
  std::bernoulli_distribution b(0.15);
  at::Tensor t = at::empty({n, num_segments}, at::kBool);
  bool* p = t.data_ptr<bool>();
  for (int64_t i = 0; i < n * num_segments; ++i) p[i] = b(rng);
  return t;
}

std::vector<double> naive(const at::Tensor& values, const at::Tensor& ids, int64_t num_segments) {
  const int64_t n = values.size(0), k = values.size(1);
  std::vector<double> out((num_segments + 1) * k, 0.0);
  const float* v = values.data_ptr<float>();
  auto add = [&](int64_t row, int64_t i) {
    for (int64_t j = 0; j < k; ++j) out[row * k + j] += v[i * k + j];
  };
  for (int64_t i = 0; i < n; ++i) {
    if (ids.scalar_type() == at::kBool) {
      bool any = false;
      for (int64_t c = 0; c < num_segments; ++c) {
        if (ids[i][c].item<bool>()) {
          add(c, i);
          any = true;
        }
      }
      if (!any) add(num_segments, i);
    } else {
      const int64_t id = ids.data_ptr<int64_t>()[i];
      if (id == -1) add(num_segments, i);
      if (id >= 0 && id < num_segments) add(id, i);
    }
  }
  return out;
}

void expect_matches_naive(const at::Tensor& got, const at::Tensor& values, const at::Tensor& ids,
                          int64_t num_segments, const char* what) {
  const int64_t k = values.size(1);
  EXPECT_OR_DIE(got.scalar_type() == at::kFloat, "%s: dtype", what);
  EXPECT_OR_DIE(got.dim() == 2 && got.size(0) == num_segments + 1 && got.size(1) == k, "%s: shape", what);
  const std::vector<double> want = naive(values, ids, num_segments);
  const float* g = got.data_ptr<float>();
  for (size_t j = 0; j < want.size(); ++j) {
    const double tol = 1e-5 + 2e-6 * std::fabs(want[j]);
    EXPECT_OR_DIE(std::fabs(g[j] - want[j]) <= tol, "%s: element %zu got %.9g want %.9g", what, j, g[j], want[j]);
  }
}

at::Tensor call_dispatcher(const at::Tensor& values, const at::Tensor& ids, int64_t num_segments) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("catdpo::segment_reduce", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(values, ids, num_segments);
}

}  // namespace

int main() {
  int cases = 0;
  for (int64_t n : {0, 1, 7, 5000, 300000}) {
    for (int64_t num_segments : {0, 1, 5, 19}) {
      for (int64_t k : {0, 1, 6}) {
        const at::Tensor values = random_values(n, k);
        const at::Tensor ids = random_ids(n, num_segments);
        const at::Tensor got = catdpo::segment_reduce_cpu(values, ids, num_segments);
        expect_matches_naive(got, values, ids, num_segments, "int ids");
        EXPECT_OR_DIE(at::equal(got, call_dispatcher(values, ids, num_segments)), "dispatcher result differs");
        if (n <= 5000) {
          const at::Tensor member = random_multi_hot(n, num_segments);
          expect_matches_naive(catdpo::segment_reduce_cpu(values, member, num_segments), values, member,
                               num_segments, "multi-hot");
        }
        ++cases;
      }
    }
  }

  // Empty segments stay exactly zero; an all -1 batch fills only the none row.
  {
    const at::Tensor values = random_values(1000, 6);
    const at::Tensor ids = at::full({1000}, -1, at::kLong);
    const at::Tensor got = catdpo::segment_reduce_cpu(values, ids, 4);
    EXPECT_OR_DIE(at::equal(got.slice(0, 0, 4), at::zeros({4, 6}, at::kFloat)), "all -1: category rows not zero");
    expect_matches_naive(got, values, ids, 4, "all -1");
  }

  // Bitwise identical across runs and thread counts (the block split depends on the shape only).
  {
    const at::Tensor values = random_values(400000, 6).mul_(1000.0);
    const at::Tensor ids = random_ids(400000, 19);
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const at::Tensor one = catdpo::segment_reduce_cpu(values, ids, 19);
    at::set_num_threads(std::max(2, threads));
    const at::Tensor many = catdpo::segment_reduce_cpu(values, ids, 19);
    const at::Tensor again = catdpo::segment_reduce_cpu(values, ids, 19);
    at::set_num_threads(threads);
    EXPECT_OR_DIE(at::equal(one, many) && at::equal(many, again), "results depend on the run or the thread count");
  }

  // The Meta kernel gives shapes without data.
  {
    const at::Tensor values = at::empty({11, 6}, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
    const at::Tensor ids = at::empty({11}, at::TensorOptions().dtype(at::kLong).device(at::kMeta));
    const at::Tensor out = call_dispatcher(values, ids, 19);
    EXPECT_OR_DIE(out.is_meta() && out.size(0) == 20 && out.size(1) == 6, "meta kernel shape");
  }

  // Bad arguments raise instead of reading out of bounds.
  {
    bool threw = false;
    try {
      catdpo::segment_reduce_cpu(random_values(4, 2), at::zeros({4, 3}, at::kBool), 2);
    } catch (const c10::Error&) {
      threw = true;
    }
    EXPECT_OR_DIE(threw, "multi-hot width != num_segments must throw");
    threw = false;
    try {
      catdpo::segment_reduce_cpu(random_values(4, 2).to(at::kDouble), at::zeros({4}, at::kLong), 2);
    } catch (const c10::Error&) {
      threw = true;
    }
    EXPECT_OR_DIE(threw, "float64 values must throw");
  }

  std::printf("test_segment_reduce: %d shape cases + edge cases passed\n", cases);
  return 0;
}
