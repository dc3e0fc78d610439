/* Host stand-in for csrc/cuda_ptx.cuh (same names and signatures): tests/test_cuda_emulated.py
 * puts this file in every emulated build directory in place of the real one. Every wrapper is
 * emulated as the PTX ISA defines it:
 *   ex2.approx.ftz: exp2f with denormal results flushed to zero (every family);
 *   and, under emu_fibers.h only (the attention kernels; warp-wide instructions need its fibers):
 *   ldmatrix .x1/.x2/.x4 [.trans]: lanes 8m .. 8m+7 give the row addresses (16-byte aligned, in
 *     shared memory) of 8 x 8 b16 matrix m; register m of lane l gets (row l / 4, cols 2 (l % 4),
 *     +1) of matrix m, the lower column in the low half (.trans: of the transposed matrix);
 *   mma.m16n8k16 row.col, f32 accumulate, f16 / bf16 operands (fragments as in the real header);
 *     the products are exact in float, the sum is taken in float (the order may differ slightly
 *     from the tensor cores');
 *   cp.async: recorded at issue, lands at the cp.async.wait_group that retires its group.
 * A new wrapper in the real header needs its twin here (emu_ldmatrix / emu_mma_16816 /
 * emu_cp_async cover the other shapes of these instructions). */
#ifndef CF_CUDA_PTX_CUH
#define CF_CUDA_PTX_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <cmath>

namespace cfcuda {

/* ex2.approx.ftz.f32 */
static inline float ex2_fast(float x) {
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;
}

}  // namespace cfcuda

#ifdef EMU_FIBERS_H
namespace cfcuda {

/* a 32-bit "shared address": the offset into the launch's dynamic shared memory */
static inline uint32_t smem_u32(const void *p) {
  emu_check_smem(p, 1, "smem_u32");
  return (uint32_t)((const unsigned char *)p - emu_dyn_smem);
}

struct EmuRegs4 {
  uint32_t r[4];
};

/* ldmatrix.sync.aligned.m8n8.x{nmat}[.trans].shared.b16 */
static inline EmuRegs4 emu_ldmatrix(const void *p, int nmat, bool trans) {
  const char *what = trans ? "ldmatrix.trans" : "ldmatrix";
  return emu_warp_op<EmuRegs4>(what, p, [nmat, trans, what](const void *const *rows, EmuRegs4 *out) {
    uint16_t m[4][8][8];
    for (int i = 0; i < nmat; i++)
      for (int r = 0; r < 8; r++) {
        const void *row = rows[8 * i + r];
        if ((uintptr_t)row % 16) emu_fail("%s: row address %p of matrix %d is not 16-byte aligned", what, row, i);
        emu_check_smem(row, 16, what);
        memcpy(m[i][r], row, 16);
      }
    for (int l = 0; l < 32; l++)
      for (int i = 0; i < 4; i++) {
        const int g = l / 4, c = 2 * (l % 4);
        const uint16_t lo = i >= nmat ? 0 : trans ? m[i][c][g] : m[i][g][c];
        const uint16_t hi = i >= nmat ? 0 : trans ? m[i][c + 1][g] : m[i][g][c + 1];
        out[l].r[i] = (uint32_t)lo | (uint32_t)hi << 16;
      }
  });
}

static inline void ldsm_x4(uint32_t (&r)[4], const void *p) {
  const EmuRegs4 o = emu_ldmatrix(p, 4, false);
  memcpy(r, o.r, sizeof r);
}
static inline void ldsm_x4_t(uint32_t (&r)[4], const void *p) {
  const EmuRegs4 o = emu_ldmatrix(p, 4, true);
  memcpy(r, o.r, sizeof r);
}

static inline float emu_b16_to_float(uint16_t x, bool bf16) {
  if (bf16) return __uint_as_float((uint32_t)x << 16);
  __half_raw h;
  h.x = x;
  return __half2float(__half(h));
}

struct EmuMmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
struct EmuMmaOut {
  float d[4];
};

/* mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d = A (16 x 16) B (16 x 8) + c */
static inline void emu_mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  EmuMmaIn in;
  memcpy(in.a, a, sizeof in.a);
  in.b[0] = b0, in.b[1] = b1;
  memcpy(in.c, c, sizeof in.c);
  const char *what = bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16";
  const EmuMmaOut o = emu_warp_op<EmuMmaOut>(what, in, [bf16](const EmuMmaIn *in, EmuMmaOut *out) {
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; l++) {
          const int g = l / 4, t = l % 4;
          for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = emu_b16_to_float((uint16_t)(in[l].a[0] >> 16 * h), bf16);
            A[g + 8][2 * t + h] = emu_b16_to_float((uint16_t)(in[l].a[1] >> 16 * h), bf16);
            A[g][2 * t + 8 + h] = emu_b16_to_float((uint16_t)(in[l].a[2] >> 16 * h), bf16);
            A[g + 8][2 * t + 8 + h] = emu_b16_to_float((uint16_t)(in[l].a[3] >> 16 * h), bf16);
            B[2 * t + h][g] = emu_b16_to_float((uint16_t)(in[l].b[0] >> 16 * h), bf16);
            B[2 * t + 8 + h][g] = emu_b16_to_float((uint16_t)(in[l].b[1] >> 16 * h), bf16);
          }
        }
        for (int l = 0; l < 32; l++) {
          const int g = l / 4, t = l % 4;
          for (int e = 0; e < 4; e++) {
            const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
            float s = 0.f;
            for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
            out[l].d[e] = in[l].c[e] + s;
          }
        }
      });
  memcpy(c, o.d, sizeof o.d);
}

template <int BF16> static inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma_16816(c, a, b0, b1, BF16 != 0);
}

/* cp.async.cg.shared.global [s], [g], 16 */
static inline void cp_async16(void *s, const void *g) { emu_cp_async(s, g, 16, 16); }
static inline void cp_async_commit() { emu_cp_async_commit(); }
template <int N> static inline void cp_async_wait() { emu_cp_async_wait(N); }

}  // namespace cfcuda
#endif  // EMU_FIBERS_H
#endif
