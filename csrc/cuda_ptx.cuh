/* Every inline PTX instruction of the CUDA kernels, each behind one small wrapper: the fast base-2
 * exponential (all softmax kernels, through cuda_math.cuh) and, for the fused attention kernels,
 * warp-wide ldmatrix and mma.sync and cp.async. Kept in this one header, apart from the kernels,
 * so that tests/test_cuda_emulated.py can compile every .cu as host C++ with an emulated copy of
 * exactly this header (tests/cuda_emu/cuda_ptx.cuh) standing in; it rejects asm anywhere else.
 *
 * Register fragments (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
 *   accumulator C (16 x 8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
 *   A (16 x 16, row-major):  a0 = (g, 2t..), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
 *   B (16 x 8, "col"):       b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g)
 * ldmatrix .x4: lanes 8m .. 8m+7 give the row addresses of 8 x 8 matrix m; register m of lane l
 * receives (row l / 4, cols 2 (l % 4), +1) of matrix m (.trans: the transposed matrix). */
#ifndef CF_CUDA_PTX_CUH
#define CF_CUDA_PTX_CUH
#include <stdint.h>

namespace cfcuda {

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

/* c += a . b, m16n8k16, fp32 accumulate; BF16 = 1: bfloat16 operands, 0: float16 */
template <int BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* cp.async: a 16-byte global -> shared copy in the background; completion: cp_async_wait, then a
 * barrier (other threads' copies). */
__device__ __forceinline__ void cp_async16(void *s, const void *g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(s)), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* wait until at most N of this thread's committed groups are still in flight */
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* 2^x on the SFU (ex2.approx.ftz: ~2 ulp, denormal results flush to 0, 2^-inf = 0). exp2f() adds
 * range handling around the same instruction that the softmax does not need. */
__device__ __forceinline__ float ex2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cfcuda
#endif
