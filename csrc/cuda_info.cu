/* Runtime facts for build_info(): the driver's CUDA version as seen by our (static) runtime. */
#include "cuda_util.cuh"

extern "C" int cf_cuda_driver_version(void) {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return -1;
  return v;
}
