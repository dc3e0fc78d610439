/* Definitions shared by every translation unit, C (gcc) and CUDA (nvcc) alike.
 * Per-element math lives in CF_INLINE functions so the CPU tests exercise what the GPU runs. */
#ifndef CF_COMMON_H
#define CF_COMMON_H
#include <stdint.h>
#include <stddef.h>

#if defined(__CUDACC__)
#define CF_INLINE static __forceinline__ __host__ __device__
#else
#define CF_INLINE static inline
#endif

#if defined(__cplusplus)
#define CF_EXTERN_C extern "C"
#else
#define CF_EXTERN_C
#endif

/* dtype codes used across the boundary (see tensor.c for the DLPack mapping) */
enum {
  CF_F32 = 1 << 0,
  CF_F64 = 1 << 1,
  CF_F16 = 1 << 2,
  CF_BF16 = 1 << 3,
  CF_I32 = 1 << 4,
  CF_I64 = 1 << 5,
  CF_BOOL = 1 << 6,
  CF_U8 = 1 << 7,
};
enum { CF_DEV_CPU = 1, CF_DEV_CUDA = 2 };

#define CF_MAX_DIMS 8

/* The one stride vocabulary of every kernel argument block: element strides of a tensor's batch,
 * head and token dimensions (its last dimension, when it has one more, has stride 1). A missing
 * dimension has stride 0, and so has a broadcast one: positions (Bp, L) are {b, 0, l} with b = 0
 * when Bp = 1. */
typedef struct {
  int64_t b, h, l;
} CfStrides;

/* Hot CPU loops get an AVX2/FMA clone picked at load time; the default clone stays portable. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define CF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CF_CLONES
#endif

#endif
