// The ATen the kernels use, and no more: <torch/extension.h> (PyTorch's C++ frontend, autograd and
// Python bindings) took 40 s to parse per source file on a 2-core AVX2 host, this header 11-12 s
// (<ATen/ATen.h>, every op, 12.6 s: the whole build 82 s against 73-76 s with this list; bench/RESULTS.md,
// "the kernels' build"). decoder.cpp, which binds the module to Python, adds torch/csrc/utils/pybind.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
