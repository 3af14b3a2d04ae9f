// Input checks for the C++ bindings (never included by .cu files: they see only CUDA headers).
#pragma once

#include <ATen/ATen.h>

#define AGF_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define AGF_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define AGF_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define AGF_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got ", (x).dim())
#define AGF_CHECK_INPUT(x, dev) \
  AGF_CHECK_DEVICE(x, dev);     \
  AGF_CHECK_CONTIGUOUS(x)
