// CPU kernel, shape checks, the Meta kernel and the op schema of catdpo::segment_reduce.
#include "segment_reduce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace catdpo {

void check_segment_reduce_args(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments,
                               c10::DeviceType device) {
  TORCH_CHECK(num_segments >= 0, "segment_reduce: num_segments must be >= 0, got ", num_segments);
  TORCH_CHECK(values.dim() == 2, "segment_reduce: values must be (N, K), got ", values.dim(), " dims");
  TORCH_CHECK(values.scalar_type() == at::kFloat, "segment_reduce: values must be float32, got ",
              values.scalar_type());
  TORCH_CHECK(values.device().type() == device && segment_ids.device() == values.device(),
              "segment_reduce: values and segment_ids must both be on ", device, ", got ", values.device(), " and ",
              segment_ids.device());
  if (segment_ids.scalar_type() == at::kBool) {
    TORCH_CHECK(segment_ids.dim() == 2 && segment_ids.sym_size(0) == values.sym_size(0) &&
                    segment_ids.sym_size(1) == num_segments,
                "segment_reduce: bool multi-hot segment_ids must be (N, num_segments) = (", values.sym_size(0), ", ",
                num_segments, "), got ", segment_ids.sym_sizes());
  } else {
    TORCH_CHECK(segment_ids.scalar_type() == at::kLong,
                "segment_reduce: segment_ids must be int64 ids or a bool multi-hot matrix, got ",
                segment_ids.scalar_type());
    TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.sym_size(0) == values.sym_size(0),
                "segment_reduce: int64 segment_ids must be (N,) = (", values.sym_size(0), ",), got ",
                segment_ids.sym_sizes());
  }
}

namespace {

inline void add_row(double* dst, const float* src, int64_t k) {
  for (int64_t j = 0; j < k; ++j) dst[j] += static_cast<double>(src[j]);
}

// Rows [begin, end) into acc ((num_segments + 1) x k doubles), in row order.
void accumulate_ids(const float* v, const int64_t* ids, int64_t begin, int64_t end, int64_t k,
                    int64_t num_segments, double* acc) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t id = ids[i];
    int64_t row;
    if (id == -1) {
      row = num_segments;
    } else if (id >= 0 && id < num_segments) {
      row = id;
    } else {
      continue;  // out of range: counts nowhere, never indexes
    }
    add_row(acc + row * k, v + i * k, k);
  }
}

void accumulate_multi_hot(const float* v, const uint8_t* member, int64_t begin, int64_t end, int64_t k,
                          int64_t num_segments, double* acc) {
  for (int64_t i = begin; i < end; ++i) {
    // Read bools as bytes: any non-zero byte is a member, without relying on 0/1 storage.
    const uint8_t* m = member + i * num_segments;
    const float* src = v + i * k;
    bool any = false;
    for (int64_t c = 0; c < num_segments; ++c) {
      if (m[c] != 0) {
        any = true;
        add_row(acc + c * k, src, k);
      }
    }
    if (!any) add_row(acc + num_segments * k, src, k);
  }
}

// Number of row blocks with their own partial table. It depends on the shape
// only, never on the thread count, so the summation order (and the bits) is the
// same on every machine and every run.
int64_t cpu_num_blocks(int64_t n, int64_t table_size) {
  constexpr int64_t kMinRowsPerBlock = 4096;
  constexpr int64_t kMaxBlocks = 256;
  constexpr int64_t kMaxPartialDoubles = int64_t{1} << 22;  // 32 MiB of partial tables at most
  const int64_t by_rows = (n + kMinRowsPerBlock - 1) / kMinRowsPerBlock;
  const int64_t by_memory = std::max<int64_t>(1, kMaxPartialDoubles / std::max<int64_t>(1, table_size));
  return std::max<int64_t>(1, std::min({by_rows, kMaxBlocks, by_memory}));
}

}  // namespace

at::Tensor segment_reduce_cpu(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments) {
  check_segment_reduce_args(values, segment_ids, num_segments, c10::DeviceType::CPU);
  const int64_t n = values.size(0);
  const int64_t k = values.size(1);
  const int64_t rows = num_segments + 1;
  at::Tensor out = at::zeros({rows, k}, values.options());
  if (n == 0 || k == 0) return out;

  const at::Tensor v = values.contiguous();
  const at::Tensor ids = segment_ids.contiguous();
  const float* vp = v.const_data_ptr<float>();
  const bool multi_hot = ids.scalar_type() == at::kBool;
  const void* idp = ids.const_data_ptr();

  const int64_t table = rows * k;
  const int64_t blocks = cpu_num_blocks(n, table);
  const int64_t block_rows = (n + blocks - 1) / blocks;
  std::vector<double> partial(static_cast<size_t>(blocks * table), 0.0);

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * block_rows;
      const int64_t end = std::min(n, begin + block_rows);
      double* acc = partial.data() + b * table;
      if (multi_hot) {
        accumulate_multi_hot(vp, static_cast<const uint8_t*>(idp), begin, end, k, num_segments, acc);
      } else {
        accumulate_ids(vp, static_cast<const int64_t*>(idp), begin, end, k, num_segments, acc);
      }
    }
  });

  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / blocks);
  at::parallel_for(0, table, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double s = 0.0;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * table + j];
      op[j] = static_cast<float>(s);
    }
  });
  return out;
}

namespace {

// Shape inference for torch.compile / FakeTensor; SymInt-aware so dynamic N and K trace.
at::Tensor segment_reduce_meta(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments) {
  check_segment_reduce_args(values, segment_ids, num_segments, c10::DeviceType::Meta);
  return at::empty_symint({c10::SymInt(num_segments + 1), values.sym_size(1)}, values.options());
}

}  // namespace
}  // namespace catdpo

TORCH_LIBRARY(catdpo, m) {
  m.def("segment_reduce(Tensor values, Tensor segment_ids, int num_segments) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(catdpo, CPU, m) { m.impl("segment_reduce", &catdpo::segment_reduce_cpu); }

TORCH_LIBRARY_IMPL(catdpo, Meta, m) { m.impl("segment_reduce", &catdpo::segment_reduce_meta); }
