// Segmented category sums: values (N, K) fp32 + segment ids -> (num_segments + 1, K) fp32.
//
// segment_ids is either (N,) int64, where -1 selects the extra "none" row
// num_segments, or (N, num_segments) bool multi-hot, where a pair counts in
// every row it carries and an all-false pair counts in the "none" row. Ids
// outside [-1, num_segments) count nowhere. Every kernel accumulates in double
// in an order fixed by the shapes alone, so repeated runs are bitwise identical.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>

namespace catdpo {

// Validates shapes and dtypes; `device` is the device type the caller's kernel runs on.
void check_segment_reduce_args(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments,
                               c10::DeviceType device);

at::Tensor segment_reduce_cpu(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments);

#ifdef CATDPO_WITH_CUDA
at::Tensor segment_reduce_cuda(const at::Tensor& values, const at::Tensor& segment_ids, int64_t num_segments);
#endif

}  // namespace catdpo
