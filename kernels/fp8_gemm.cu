// FP8 linear layers (OCP E4M3 or E5M2) with block scaling: Y[M,N] = X[M,K] W[N,K]^T.
//
// Scales (fp32): activations per 1x128 block, sx[M, KB]; weights per 128x128 block, sw[NB, KB],
// KB = ceil(K/128), NB = ceil(N/128); value = fp8 * scale. Output fp16 or bf16, row-major.
// Every kernel exists for E4M3 (the names below) and E5M2 (the same names + "_e5m2"): one template
// over the format (its fp32 -> fp8 conversion, max 448 | 57344, MMA type and fp16 widening).
// Requirements (checked on the host): K % 16 == 0, all buffers 16-byte aligned and contiguous.
//
// Kernels:
//   fp8_quantize_act_{f16,bf16}   X (fp16|bf16) -> Xq (fp8) + sx, scale = max(amax/fp8_max, 1e-10)
//   fp8_gemm_w8a8_{f16,bf16}out   sm_89/sm_90: FP8 tensor-core MMA (mma.sync m16n8k32 e4m3|e5m2)
//   fp8_gemm_wonly_{f16,bf16}out  any sm_80+ (the sm_87 path): fp16 X, FP8 weights converted to
//                                 fp16 in registers, fp16 MMA (m16n8k16)
//
// Both GEMMs use a 128-deep K tile, i.e. exactly one scale block per main-loop step: the MMAs of
// a step accumulate into a fresh fp32 partial sum that is then multiplied by its scales and added
// to the fp32 accumulator (DeepGEMM-style "promotion"), so the block scales are applied exactly
// once per block in fp32. Tiles are staged through shared memory with a 2-deep cp.async pipeline.
//
// Fragment loads use one consistent permutation of k inside each MMA (see load comments): the
// tensor core sums over its k index, so any bijection applied identically to A and B gives the
// same product, and this one lets every lane fetch its A/B registers with single 64-bit loads.
#include "common.cuh"

// 1 in the code for an arch whose W8A8 kernel really uses FP8 MMA (sm_89+ built by CUDA >= 12.4),
// 0 where it is a trap stub. The host reads it from the loaded module before launching W8A8.
#if !defined(VILA_HOST_SIM)
extern "C" __device__ int vila_fp8_mma_available = VILA_ARCH_HAS_FP8_MMA;
#endif

// ------------------------------------------------------------------------------------------
// Activation quantization: one warp per (row, 128-wide K block), 4 elements per lane.
// ------------------------------------------------------------------------------------------
template <bool IN_BF16, bool E5M2>
VILA_DEVICE_INLINE void quantize_act_body(const u16* __restrict__ x, u8* __restrict__ xq,
                                          float* __restrict__ sx, int M, int K) {
    const int KB = (K + 127) / 128;
    const long long item = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = (int)(threadIdx.x % 32);
    if (item >= (long long)M * KB) return;  // uniform per warp, so the shuffles below are safe
    const long long m = item / KB;
    const int kb = (int)(item % KB);
    const int k = kb * 128 + lane * 4;
    const bool valid = k < K;  // K % 16 == 0: a lane's 4 elements are all in range or all out
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (valid) {
        const uint2_t raw = *reinterpret_cast<const uint2_t*>(x + m * K + k);
        const u32 words[2] = {raw.x, raw.y};
        VILA_UNROLL
        for (int i = 0; i < 4; ++i) {
            const u16 bits = (u16)(words[i / 2] >> (16 * (i % 2)));
            v[i] = IN_BF16 ? bf2f(bits) : h2f(bits);
        }
    }
    float amax = 0.0f;
    VILA_UNROLL
    for (int i = 0; i < 4; ++i) {
        const float a = v[i] < 0.0f ? -v[i] : v[i];
        amax = a > amax ? a : amax;
    }
    amax = warp_max(amax);
    float scale = amax / fp8_max<E5M2>();
    if (!(scale >= 1e-10f)) scale = 1e-10f;  // floor (an all-zero block gets scale 1e-10)
    if (valid) {
        u32 packed = 0;
        VILA_UNROLL
        for (int i = 0; i < 4; ++i) packed |= (u32)f32_to_fp8_satfinite<E5M2>(v[i] / scale) << (8 * i);
        *reinterpret_cast<u32*>(xq + m * K + k) = packed;
    }
    if (lane == 0) sx[m * KB + kb] = scale;
}

#define VILA_FP8_QUANTIZE_ACT(NAME, IN_BF16, E5M2)                                                   \
    extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(256)                                          \
        NAME(const u16* __restrict__ x, u8* __restrict__ xq, float* __restrict__ sx, int M, int K) {   \
        quantize_act_body<IN_BF16, E5M2>(x, xq, sx, M, K);                                             \
    }
VILA_FP8_QUANTIZE_ACT(fp8_quantize_act_f16, false, false)
VILA_FP8_QUANTIZE_ACT(fp8_quantize_act_bf16, true, false)
VILA_FP8_QUANTIZE_ACT(fp8_quantize_act_f16_e5m2, false, true)
VILA_FP8_QUANTIZE_ACT(fp8_quantize_act_bf16_e5m2, true, true)

// ------------------------------------------------------------------------------------------
// Shared helpers for the GEMMs.
// ------------------------------------------------------------------------------------------

// Copy a rows x (row_bytes) tile of a row-major matrix (row stride ld_bytes) into shared memory
// with row stride smem_ld, as 16-byte cp.async chunks; chunks outside the matrix are zero-filled,
// which makes partial M/N/K tiles contribute exactly 0 to the products.
template <int ROWS, int ROW_BYTES, int THREADS>
VILA_DEVICE_INLINE void load_tile_async(u8* smem, int smem_ld, const u8* g, long long ld_bytes,
                                        int row0, int rows_total, long long col_byte0,
                                        long long cols_bytes_total, int tid) {
    constexpr int CHUNKS_PER_ROW = ROW_BYTES / 16;
    for (int i = tid; i < ROWS * CHUNKS_PER_ROW; i += THREADS) {
        const int r = i / CHUNKS_PER_ROW;
        const int cb = (i % CHUNKS_PER_ROW) * 16;
        const int gr = row0 + r;
        const long long gc = col_byte0 + cb;
        const bool valid = gr < rows_total && gc < cols_bytes_total;
        const u8* src = valid ? g + (long long)gr * ld_bytes + gc : g;
        cp_async_16(smem + r * smem_ld + cb, src, valid);
    }
}

template <bool OUT_BF16>
VILA_DEVICE_INLINE u16 to_out(float v) {
    return OUT_BF16 ? f2bf(v) : f2h(v);
}

// Store the (row, col) and (row, col+1) outputs; col is even.
template <bool OUT_BF16>
VILA_DEVICE_INLINE void store_pair(u16* __restrict__ y, long long row, int col, int N, float v0, float v1) {
    u16* p = y + row * N + col;
    if ((N % 2) == 0 && col + 1 < N) {
        *reinterpret_cast<u32*>(p) = (u32)to_out<OUT_BF16>(v0) | ((u32)to_out<OUT_BF16>(v1) << 16);
    } else {
        if (col < N) p[0] = to_out<OUT_BF16>(v0);
        if (col + 1 < N) p[1] = to_out<OUT_BF16>(v1);
    }
}

// ------------------------------------------------------------------------------------------
// W8A8: block tile 128x128x128, 8 warps as 2 (M) x 4 (N), warp tile 64x32 = 4x4 MMAs m16n8k32.
// ------------------------------------------------------------------------------------------
namespace w8a8 {
constexpr int BM = 128, BN = 128, BK = 128, THREADS = 256;
// Shared-memory row stride in bytes: 16-byte aligned for cp.async and = 8 words (mod 32 banks),
// so the 16 lanes of each half-warp's 8-byte fragment loads hit 32 distinct banks.
constexpr int LDS = BK + 32;
constexpr int STAGE_BYTES = (BM + BN) * LDS;
constexpr int SMEM_BYTES = 2 * STAGE_BYTES;  // 81920: needs the > 48 KiB opt-in
static_assert(SMEM_BYTES <= 99 * 1024, "must fit sm_89's 99 KiB per-block shared memory limit");
}  // namespace w8a8

template <bool OUT_BF16, bool E5M2>
VILA_DEVICE_INLINE void gemm_w8a8_body(const u8* __restrict__ xq, const float* __restrict__ sx,
                                       const u8* __restrict__ wq, const float* __restrict__ sw,
                                       u16* __restrict__ y, int M, int N, int K) {
    using namespace w8a8;
    VILA_DYNAMIC_SMEM(smem);
    const int tid = (int)threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;  // MMA "groupID" and "threadID_in_group"
    const int warp_m = warp / 4, warp_n = warp % 4;
    const int m0 = (int)blockIdx.y * BM, n0 = (int)blockIdx.x * BN;
    const int KB = (K + BK - 1) / BK;
    const float* sw_row = sw + (long long)(n0 / 128) * KB;  // BN == 128: one weight block column

    float acc[4][4][4];
    VILA_UNROLL
    for (int i = 0; i < 4; ++i)
        VILA_UNROLL
        for (int j = 0; j < 4; ++j)
            VILA_UNROLL
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    auto load_stage = [&](int stage, int kb) {
        u8* As = smem + stage * STAGE_BYTES;
        u8* Bs = As + BM * LDS;
        load_tile_async<BM, BK, THREADS>(As, LDS, xq, K, m0, M, (long long)kb * BK, K, tid);
        load_tile_async<BN, BK, THREADS>(Bs, LDS, wq, K, n0, N, (long long)kb * BK, K, tid);
        cp_async_commit();
    };

    load_stage(0, 0);
    for (int kb = 0; kb < KB; ++kb) {
        if (kb + 1 < KB) {
            load_stage((kb + 1) & 1, kb + 1);  // overlaps with this step's MMAs
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // This step's scales, fetched before the MMAs so their latency is hidden.
        const float s_w = sw_row[kb];
        float s_a[4][2];
        VILA_UNROLL
        for (int mt = 0; mt < 4; ++mt) {
            const int r = m0 + warp_m * 64 + mt * 16 + g;
            s_a[mt][0] = r < M ? sx[(long long)r * KB + kb] * s_w : 0.0f;
            s_a[mt][1] = r + 8 < M ? sx[(long long)(r + 8) * KB + kb] * s_w : 0.0f;
        }

        const u8* As = smem + (kb & 1) * STAGE_BYTES;
        const u8* Bs = As + BM * LDS;
        float part[4][4][4];
        VILA_UNROLL
        for (int i = 0; i < 4; ++i)
            VILA_UNROLL
            for (int j = 0; j < 4; ++j)
                VILA_UNROLL
                for (int r = 0; r < 4; ++r) part[i][j][r] = 0.0f;

        VILA_UNROLL
        for (int kk = 0; kk < BK / 32; ++kk) {
            // A regs 0/2 (row g) and 1/3 (row g+8) hold MMA k 4t..4t+3 and 16+4t..16+4t+3; we feed
            // them tile columns 8t..8t+3 and 8t+4..8t+7 (one 8-byte load per row), and B regs 0/1
            // the same columns, so the k permutation is identical for A and B.
            u32 a[4][4], b[4][2];
            VILA_UNROLL
            for (int mt = 0; mt < 4; ++mt) {
                const u8* p = As + (warp_m * 64 + mt * 16 + g) * LDS + kk * 32 + t * 8;
                const uint2_t lo = *reinterpret_cast<const uint2_t*>(p);
                const uint2_t hi = *reinterpret_cast<const uint2_t*>(p + 8 * LDS);
                a[mt][0] = lo.x;
                a[mt][1] = hi.x;
                a[mt][2] = lo.y;
                a[mt][3] = hi.y;
            }
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                const u8* q = Bs + (warp_n * 32 + nt * 8 + g) * LDS + kk * 32 + t * 8;
                const uint2_t v = *reinterpret_cast<const uint2_t*>(q);
                b[nt][0] = v.x;
                b[nt][1] = v.y;
            }
            VILA_UNROLL
            for (int mt = 0; mt < 4; ++mt)
                VILA_UNROLL
                for (int nt = 0; nt < 4; ++nt) mma_fp8_16832<E5M2>(part[mt][nt], a[mt], b[nt]);
        }

        VILA_UNROLL
        for (int mt = 0; mt < 4; ++mt)
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                acc[mt][nt][0] += part[mt][nt][0] * s_a[mt][0];
                acc[mt][nt][1] += part[mt][nt][1] * s_a[mt][0];
                acc[mt][nt][2] += part[mt][nt][2] * s_a[mt][1];
                acc[mt][nt][3] += part[mt][nt][3] * s_a[mt][1];
            }
        __syncthreads();  // the next iteration's prefetch overwrites the stage just read
    }

    VILA_UNROLL
    for (int mt = 0; mt < 4; ++mt)
        VILA_UNROLL
        for (int half = 0; half < 2; ++half) {
            const int r = m0 + warp_m * 64 + mt * 16 + g + half * 8;
            if (r >= M) continue;
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                const int c = n0 + warp_n * 32 + nt * 8 + 2 * t;
                store_pair<OUT_BF16>(y, r, c, N, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
            }
        }
}

#define VILA_FP8_GEMM_W8A8(NAME, OUT_BF16, E5M2)                                                     \
    extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(256)                                          \
        NAME(const u8* __restrict__ xq, const float* __restrict__ sx, const u8* __restrict__ wq,         \
             const float* __restrict__ sw, u16* __restrict__ y, int M, int N, int K) {                   \
        gemm_w8a8_body<OUT_BF16, E5M2>(xq, sx, wq, sw, y, M, N, K);                                    \
    }
VILA_FP8_GEMM_W8A8(fp8_gemm_w8a8_f16out, false, false)
VILA_FP8_GEMM_W8A8(fp8_gemm_w8a8_bf16out, true, false)
VILA_FP8_GEMM_W8A8(fp8_gemm_w8a8_f16out_e5m2, false, true)
VILA_FP8_GEMM_W8A8(fp8_gemm_w8a8_bf16out_e5m2, true, true)

// ------------------------------------------------------------------------------------------
// Weight-only (sm_87 path): fp16 X, fp8 W. Block tile 64x128x128, 8 warps as 2 (M) x 4 (N),
// warp tile 32x32 = 2x4 MMAs m16n8k16. The weight bytes are widened to fp16 exactly (e4m3 and e5m2
// values are representable in fp16), the 128x128 weight scale is applied per K step in fp32.
// ------------------------------------------------------------------------------------------
namespace wonly {
constexpr int BM = 64, BN = 128, BK = 128, THREADS = 256;
constexpr int LDA = BK * 2 + 32;  // bytes; = 8 words mod 32: conflict-free 8-byte A loads
constexpr int LDB = BK + 16;      // bytes; = 4 words mod 32: conflict-free 4-byte B loads
constexpr int STAGE_BYTES = BM * LDA + BN * LDB;
constexpr int SMEM_BYTES = 2 * STAGE_BYTES;  // 73728: needs the > 48 KiB opt-in
static_assert(SMEM_BYTES <= 99 * 1024, "must fit sm_89's 99 KiB per-block shared memory limit");
}  // namespace wonly

template <bool OUT_BF16, bool E5M2>
VILA_DEVICE_INLINE void gemm_wonly_body(const u16* __restrict__ x, const u8* __restrict__ wq,
                                        const float* __restrict__ sw, u16* __restrict__ y, int M,
                                        int N, int K) {
    using namespace wonly;
    VILA_DYNAMIC_SMEM(smem);
    const int tid = (int)threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;
    const int warp_m = warp / 4, warp_n = warp % 4;
    const int m0 = (int)blockIdx.y * BM, n0 = (int)blockIdx.x * BN;
    const int KB = (K + BK - 1) / BK;
    const float* sw_row = sw + (long long)(n0 / 128) * KB;
    const u8* xb = reinterpret_cast<const u8*>(x);

    float acc[2][4][4];
    VILA_UNROLL
    for (int i = 0; i < 2; ++i)
        VILA_UNROLL
        for (int j = 0; j < 4; ++j)
            VILA_UNROLL
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    auto load_stage = [&](int stage, int kb) {
        u8* As = smem + stage * STAGE_BYTES;
        u8* Bs = As + BM * LDA;
        load_tile_async<BM, BK * 2, THREADS>(As, LDA, xb, 2LL * K, m0, M, 2LL * kb * BK, 2LL * K, tid);
        load_tile_async<BN, BK, THREADS>(Bs, LDB, wq, K, n0, N, (long long)kb * BK, K, tid);
        cp_async_commit();
    };

    load_stage(0, 0);
    for (int kb = 0; kb < KB; ++kb) {
        if (kb + 1 < KB) {
            load_stage((kb + 1) & 1, kb + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const float s_w = sw_row[kb];
        const u8* As = smem + (kb & 1) * STAGE_BYTES;
        const u8* Bs = As + BM * LDA;
        float part[2][4][4];
        VILA_UNROLL
        for (int i = 0; i < 2; ++i)
            VILA_UNROLL
            for (int j = 0; j < 4; ++j)
                VILA_UNROLL
                for (int r = 0; r < 4; ++r) part[i][j][r] = 0.0f;

        VILA_UNROLL
        for (int kk = 0; kk < BK / 16; ++kk) {
            // MMA k pairs (2t, 2t+1) / (8+2t, 9+2t) are fed tile columns (4t, 4t+1) / (4t+2, 4t+3),
            // identically for A and B: one 8-byte load per A row, one 4-byte load per B column.
            u32 a[2][4], b[4][2];
            VILA_UNROLL
            for (int mt = 0; mt < 2; ++mt) {
                const u8* p = As + (warp_m * 32 + mt * 16 + g) * LDA + (kk * 16 + t * 4) * 2;
                const uint2_t lo = *reinterpret_cast<const uint2_t*>(p);
                const uint2_t hi = *reinterpret_cast<const uint2_t*>(p + 8 * LDA);
                a[mt][0] = lo.x;
                a[mt][1] = hi.x;
                a[mt][2] = lo.y;
                a[mt][3] = hi.y;
            }
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                const u32 v = *reinterpret_cast<const u32*>(Bs + (warp_n * 32 + nt * 8 + g) * LDB + kk * 16 + t * 4);
                b[nt][0] = fp8x2_to_f16x2<E5M2>(v & 0xFFFFu);
                b[nt][1] = fp8x2_to_f16x2<E5M2>(v >> 16);
            }
            VILA_UNROLL
            for (int mt = 0; mt < 2; ++mt)
                VILA_UNROLL
                for (int nt = 0; nt < 4; ++nt) mma_f16_16816(part[mt][nt], a[mt], b[nt]);
        }

        VILA_UNROLL
        for (int mt = 0; mt < 2; ++mt)
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt)
                VILA_UNROLL
                for (int r = 0; r < 4; ++r) acc[mt][nt][r] += part[mt][nt][r] * s_w;
        __syncthreads();
    }

    VILA_UNROLL
    for (int mt = 0; mt < 2; ++mt)
        VILA_UNROLL
        for (int half = 0; half < 2; ++half) {
            const int r = m0 + warp_m * 32 + mt * 16 + g + half * 8;
            if (r >= M) continue;
            VILA_UNROLL
            for (int nt = 0; nt < 4; ++nt) {
                const int c = n0 + warp_n * 32 + nt * 8 + 2 * t;
                store_pair<OUT_BF16>(y, r, c, N, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
            }
        }
}

#define VILA_FP8_GEMM_WONLY(NAME, OUT_BF16, E5M2)                                                    \
    extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(256)                                          \
        NAME(const u16* __restrict__ x, const u8* __restrict__ wq, const float* __restrict__ sw,         \
             u16* __restrict__ y, int M, int N, int K) {                                                 \
        gemm_wonly_body<OUT_BF16, E5M2>(x, wq, sw, y, M, N, K);                                        \
    }
VILA_FP8_GEMM_WONLY(fp8_gemm_wonly_f16out, false, false)
VILA_FP8_GEMM_WONLY(fp8_gemm_wonly_bf16out, true, false)
VILA_FP8_GEMM_WONLY(fp8_gemm_wonly_f16out_e5m2, false, true)
VILA_FP8_GEMM_WONLY(fp8_gemm_wonly_bf16out_e5m2, true, true)
