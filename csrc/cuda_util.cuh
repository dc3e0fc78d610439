/* Helpers for .cu files. Launchers are extern "C", run on the caller's stream (passed in from
 * torch.cuda.current_stream()), and return NULL on success or a static error string. */
#ifndef CF_CUDA_UTIL_CUH
#define CF_CUDA_UTIL_CUH
#include <cuda_runtime.h>
#include "cf_common.h"

/* Make the tensor's device current for the launch and restore the caller's afterwards. */
struct CfDeviceGuard {
  int prev, cur;
  explicit CfDeviceGuard(int dev) : prev(-1), cur(dev) {
    if (cudaGetDevice(&prev) != cudaSuccess || prev != dev) cudaSetDevice(dev);
  }
  ~CfDeviceGuard() {
    if (prev >= 0 && prev != cur) cudaSetDevice(prev);
  }
};

#define CF_CUDA_TRY(expr)                                \
  do {                                                   \
    cudaError_t cf_err_ = (expr);                        \
    if (cf_err_ != cudaSuccess) return cudaGetErrorString(cf_err_); \
  } while (0)

#define CF_LAUNCH_CHECK() CF_CUDA_TRY(cudaGetLastError())

static inline unsigned cf_ceil_div_u(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

#endif
