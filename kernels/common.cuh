// vila-edge kernels: portability layer shared by every .cu file.
//
// The same kernel source is compiled three ways:
//   1. nvcc -> fatbin (sm_87 / sm_89 / sm_90 SASS + compute_87 PTX), see Makefile;
//   2. NVRTC at run time (vila_edge/kernels.py) when no fatbin matches the GPU;
//   3. g++ on the CPU with VILA_HOST_SIM defined (kernels/sim/), where every CUDA thread is a host
//      thread. This lets CI run the real kernel code (index math, tiling, fragment layouts, edge
//      masks) against the numpy references without a GPU.
// Because of (2) this header includes no CUDA headers at all (NVRTC would need include paths),
// and uses only plain integer types; even the intrinsics (bit casts, shuffles, address-space
// conversion) are one-line PTX, so the source compiles with no include path and no implicit
// header. On the host simulator the same helpers are bit-exact software.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// 16-byte vector (like CUDA's uint4, which lives in a header NVRTC would need a path for).
struct alignas(16) uint4_t {
    u32 x, y, z, w;
};
struct alignas(8) uint2_t {
    u32 x, y;
};

#if defined(VILA_HOST_SIM)
#include "sim/sim.h"
#define VILA_DEVICE inline
#define VILA_DEVICE_INLINE inline
#define VILA_GLOBAL_LAUNCH_BOUNDS(n)
#else
#define VILA_DEVICE __device__
#define VILA_DEVICE_INLINE __device__ __forceinline__
#define VILA_GLOBAL_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#endif

// Fully unroll a fixed-trip-count loop, so that small per-thread arrays indexed by the loop
// variable stay in registers instead of local memory.
#if defined(VILA_HOST_SIM)
#define VILA_UNROLL
#else
#define VILA_UNROLL _Pragma("unroll")
#endif

// Dynamically sized shared memory (the launcher passes its size; > 48 KiB needs an opt-in).
#if defined(VILA_HOST_SIM)
#define VILA_DYNAMIC_SMEM(name) u8* name = sim_dynamic_smem()
#else
#define VILA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) u8 name[]
#endif

// FP8 tensor-core MMA (mma.sync ... e4m3) needs sm_89+ and PTX ISA 8.4 (CUDA >= 12.4). Older
// toolkits (e.g. JetPack 6.0's CUDA 12.2) still compile every file: the W8A8 kernel then traps,
// and the host side only launches it on sm_89+ with a toolkit that supports it.
#if !defined(__CUDACC_VER_MAJOR__) || (__CUDACC_VER_MAJOR__ > 12) || \
    (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4)
#define VILA_TOOLKIT_HAS_FP8_MMA 1
#else
#define VILA_TOOLKIT_HAS_FP8_MMA 0
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && VILA_TOOLKIT_HAS_FP8_MMA
#define VILA_ARCH_HAS_FP8_MMA 1
#else
#define VILA_ARCH_HAS_FP8_MMA 0
#endif

// ------------------------------------------------------------------------------------------
// Bit casts and scalar conversions.
// ------------------------------------------------------------------------------------------
VILA_DEVICE_INLINE u32 f32_bits(float x) {
#if defined(VILA_HOST_SIM)
    u32 u;
    __builtin_memcpy(&u, &x, 4);
    return u;
#else
    u32 u;
    asm("mov.b32 %0, %1;" : "=r"(u) : "f"(x));
    return u;
#endif
}

VILA_DEVICE_INLINE float bits_f32(u32 u) {
#if defined(VILA_HOST_SIM)
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
#else
    float x;
    asm("mov.b32 %0, %1;" : "=f"(x) : "r"(u));
    return x;
#endif
}

// fp16 bits -> fp32 (exact).
VILA_DEVICE_INLINE float h2f(u16 h) {
#if defined(VILA_HOST_SIM)
    return sim_half_to_float(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// fp32 -> fp16 bits, round to nearest even (what torch's .to(float16) does).
VILA_DEVICE_INLINE u16 f2h(float f) {
#if defined(VILA_HOST_SIM)
    return sim_float_to_half_rn(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// bf16 bits -> fp32 (exact: bf16 is the top half of an fp32).
VILA_DEVICE_INLINE float bf2f(u16 b) { return bits_f32(((u32)b) << 16); }

// fp32 -> bf16 bits, round to nearest even.
VILA_DEVICE_INLINE u16 f2bf(float f) {
#if defined(VILA_HOST_SIM)
    return sim_float_to_bf16_rn(f);
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// fp32 -> FP8 E4M3 (OCP "e4m3fn": bias 7, max 448, no infinities, S.1111.111 = NaN), round to
// nearest even, saturating to +-448 (like cvt.rn.satfinite.e4m3x2.f32 on sm_89+). Integer-only
// so that it is identical on every arch and on the host simulator (and testable against numpy).
VILA_DEVICE_INLINE u8 f32_to_e4m3_satfinite(float x) {
    const u32 u = f32_bits(x);
    const u32 sign = (u >> 24) & 0x80u;
    const u32 a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (u8)(sign | 0x7Fu);   // NaN stays NaN
    if (a >= 0x43E00000u) return (u8)(sign | 0x7Eu);  // |x| >= 448 (incl. inf): saturate
    if (a < 0x00800000u) return (u8)sign;             // fp32 zero/subnormal: far below 2^-10
    const int e32 = (int)(a >> 23) - 127;             // unbiased exponent, |x| = sig * 2^(e32-23)
    const u32 sig = (a & 0x7FFFFFu) | 0x800000u;      // 24-bit significand
    u32 q, rem, half;
    if (e32 >= -6) {
        // Normal e4m3: keep 3 mantissa bits, i.e. drop 20 bits of the fp32 mantissa.
        q = ((u32)(e32 + 7) << 3) | ((sig >> 20) & 7u);
        rem = sig & 0xFFFFFu;
        half = 0x80000u;
    } else {
        // Subnormal e4m3: value = m * 2^-9, m = RNE(sig * 2^(e32 - 23 + 9)) = sig >> (14 - e32).
        const int shift = 14 - e32;                   // >= 21
        if (shift > 25) return (u8)sign;              // < 2^-11 < half of the smallest subnormal
        q = sig >> shift;
        rem = sig & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
    }
    // Round to nearest even; a carry out of the mantissa correctly bumps the exponent field
    // (and 0x07 -> 0x08 turns the largest subnormal into the smallest normal).
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return (u8)(sign | q);
}

// fp32 -> FP8 E5M2 (OCP: bias 15, max 57344, S.11111.00 = inf, S.11111.xx = NaN), round to
// nearest even, saturating to +-57344 (like cvt.rn.satfinite.e5m2x2.f32). Same scheme as e4m3.
VILA_DEVICE_INLINE u8 f32_to_e5m2_satfinite(float x) {
    const u32 u = f32_bits(x);
    const u32 sign = (u >> 24) & 0x80u;
    const u32 a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (u8)(sign | 0x7Fu);   // NaN stays NaN
    if (a >= 0x47600000u) return (u8)(sign | 0x7Bu);  // |x| >= 57344 (incl. inf): saturate
    if (a < 0x00800000u) return (u8)sign;             // fp32 zero/subnormal: far below 2^-17
    const int e32 = (int)(a >> 23) - 127;
    const u32 sig = (a & 0x7FFFFFu) | 0x800000u;
    u32 q, rem, half;
    if (e32 >= -14) {
        // Normal e5m2: keep 2 mantissa bits, i.e. drop 21 bits of the fp32 mantissa.
        q = ((u32)(e32 + 15) << 2) | ((sig >> 21) & 3u);
        rem = sig & 0x1FFFFFu;
        half = 0x100000u;
    } else {
        // Subnormal e5m2: value = m * 2^-16, m = RNE(sig * 2^(e32 - 23 + 16)) = sig >> (7 - e32).
        const int shift = 7 - e32;                    // >= 22
        if (shift > 25) return (u8)sign;              // < 2^-18 < half of the smallest subnormal
        q = sig >> shift;
        rem = sig & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
    }
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return (u8)(sign | q);
}

// The FP8 format a kernel is instantiated for: E5M2 = true, E4M3 = false.
template <bool E5M2>
VILA_DEVICE_INLINE u8 f32_to_fp8_satfinite(float x) {
    return E5M2 ? f32_to_e5m2_satfinite(x) : f32_to_e4m3_satfinite(x);
}

template <bool E5M2>
VILA_DEVICE_INLINE float fp8_max() {
    return E5M2 ? 57344.0f : 448.0f;
}

// Two E4M3 bytes (low byte first) -> fp16x2 of the SAME values, exactly. An e4m3 byte
// s.eeee.mmm read as the fp16 bit pattern s.0eeee.mmm0000000 is the value * 2^-8 (also for
// e4m3 subnormals, which land on fp16 subnormals), so one multiply by 256 restores it. sm_87 has
// no FP8 conversion instruction; this costs a few integer ops plus one HMUL2.
VILA_DEVICE_INLINE u32 e4m3x2_to_f16x2_scaled_down(u32 two_bytes) {
    const u32 t = (two_bytes & 0xFFu) | ((two_bytes & 0xFF00u) << 8);  // bytes -> 16-bit lanes
    return ((t & 0x007F007Fu) << 7) | ((t & 0x00800080u) << 8);
}

VILA_DEVICE_INLINE u32 e4m3x2_to_f16x2(u32 two_bytes) {
    const u32 h2 = e4m3x2_to_f16x2_scaled_down(two_bytes);
#if defined(VILA_HOST_SIM)
    return sim_hmul2_by_256(h2);
#else
    u32 r;
    const u32 k256 = 0x5C005C00u;  // fp16x2 {256, 256}
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h2), "r"(k256));
    return r;
#endif
}

// Two E5M2 bytes (low byte first) -> fp16x2, exactly: an e5m2 byte is the high byte of the fp16
// of the same value (same sign, exponent width and bias; fp16 has 8 more mantissa bits).
VILA_DEVICE_INLINE u32 e5m2x2_to_f16x2(u32 two_bytes) {
    return ((two_bytes & 0xFFu) << 8) | ((two_bytes & 0xFF00u) << 16);
}

template <bool E5M2>
VILA_DEVICE_INLINE u32 fp8x2_to_f16x2(u32 two_bytes) {
    return E5M2 ? e5m2x2_to_f16x2(two_bytes) : e4m3x2_to_f16x2(two_bytes);
}

// ------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (sm_80+). On the simulator they are plain copies done at
// issue time, which is a legal schedule of the real asynchronous copies.
// ------------------------------------------------------------------------------------------
VILA_DEVICE_INLINE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(VILA_HOST_SIM)
    if (valid) __builtin_memcpy(smem_dst, gmem_src, 16);
    else __builtin_memset(smem_dst, 0, 16);
#else
    // src-size 0 makes the hardware zero-fill the 16 destination bytes without reading gmem.
    u32 dst;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(dst) : "l"(smem_dst));
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(src_size)
                 : "memory");
#endif
}

VILA_DEVICE_INLINE void cp_async_commit() {
#if !defined(VILA_HOST_SIM)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
VILA_DEVICE_INLINE void cp_async_wait() {
#if !defined(VILA_HOST_SIM)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ------------------------------------------------------------------------------------------
// Warp-level tensor-core MMAs (fp32 accumulate, d += a * b). Fragment layouts: PTX ISA,
// "Matrix Fragments for mma.m16n8k16" (f16) and "... mma.m16n8k32" (8-bit types).
// ------------------------------------------------------------------------------------------
VILA_DEVICE_INLINE void mma_f16_16816(float d[4], const u32 a[4], const u32 b[2]) {
#if defined(VILA_HOST_SIM)
    sim_mma_f16_16816(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

VILA_DEVICE_INLINE void mma_e4m3_16832(float d[4], const u32 a[4], const u32 b[2]) {
#if defined(VILA_HOST_SIM)
    sim_mma_e4m3_16832(d, a, b);
#elif VILA_ARCH_HAS_FP8_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // No FP8 MMA on this arch (sm_87) or toolkit: the host never launches the W8A8 kernel here.
    (void)d;
    (void)a;
    (void)b;
    asm volatile("trap;");
#endif
}

VILA_DEVICE_INLINE void mma_e5m2_16832(float d[4], const u32 a[4], const u32 b[2]) {
#if defined(VILA_HOST_SIM)
    sim_mma_e5m2_16832(d, a, b);
#elif VILA_ARCH_HAS_FP8_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d;
    (void)a;
    (void)b;
    asm volatile("trap;");
#endif
}

template <bool E5M2>
VILA_DEVICE_INLINE void mma_fp8_16832(float d[4], const u32 a[4], const u32 b[2]) {
    if (E5M2) {
        mma_e5m2_16832(d, a, b);
    } else {
        mma_e4m3_16832(d, a, b);
    }
}

// Warp max-reduction of a float (all lanes get the result).
VILA_DEVICE_INLINE float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) {
#if defined(VILA_HOST_SIM)
        const float o = sim_shfl_xor(v, off);
#else
        float o;
        asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(o) : "f"(v), "r"(off));
#endif
        v = v > o ? v : o;
    }
    return v;
}
