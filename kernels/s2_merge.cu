// S2 / Dynamic-S2 feature merge (vila-reference.md §3.1, §3.3), fused into one pass:
//   for every scale: merge the chessboard of h x w feature tiles into one map, area-resample it
//   to the output grid (= adaptive average pooling, F.interpolate(mode="area")), concatenate the
//   scales along channels in ascending order, and write the projector's input layout directly.
// Nothing but the output is written: each output token gathers its source window straight from
// the tiles, so no full-size intermediate maps exist.
//
// Generic formulation (covers static S2 and dynamic S2):
//   scale s has a tile grid grid_h[s] x grid_w[s] of h x w tiles; its merged map is
//   (grid_h*h) x (grid_w*w). Tiles of scale s for batch element b: tile_base[s] + (r*grid_w + c)*batch + b
//   (tile-major over the batch, like s2wrapper's split_chessboard; batch = 1 for dynamic S2).
//   The output grid is out_h x out_w, cut into chunk_h x chunk_w chunks in row-major order, each
//   chunk's tokens row-major. Output row index = (b*n_chunks + chunk)*chunk_h*chunk_w + token,
//   row length num_scales*C, scale s occupying channels [s*C, (s+1)*C).
//   Static S2 (output idx 0, one chunk = whole map) and dynamic S2 (chunks of 32x32) are both this.
//
// Numerics: each output element is sum_{y in Y-window} sum_{x in X-window} f(y, x) accumulated in
// fp32 starting from 0 in exactly that order, then / kh / kw, then rounded to fp16 -- the same
// operations, in the same order, as PyTorch's adaptive_avg_pool2d on the fp32 map, so the result
// matches the reference bit for bit (the benchmark still allows 1 fp16 ulp).
#include "common.cuh"

#define VILA_S2_MAX_SCALES 4

struct S2MergeParams {
    int num_scales;
    int batch;
    int h, w;
    int channels;
    int out_h, out_w;
    int chunk_h, chunk_w;
    int tile_base[VILA_S2_MAX_SCALES];
    int grid_h[VILA_S2_MAX_SCALES];
    int grid_w[VILA_S2_MAX_SCALES];
    // Derived on the host (version 2 reads them instead of dividing): batch * n_chunks * chunk_h *
    // chunk_w output rows, out_w / chunk_w chunks per chunk row, n_chunks chunks per image.
    int rows;
    int chunks_w;
    int n_chunks;
};

// Source window [lo, hi) of output index i when resampling `in` samples to `out` samples:
// [floor(i*in/out), ceil((i+1)*in/out)) -- PyTorch's start_index / end_index.
VILA_DEVICE_INLINE void area_window(int i, int in, int out, int& lo, int& hi) {
    lo = (int)(((long long)i * in) / out);
    hi = (int)(((long long)(i + 1) * in + out - 1) / out);
}

// Version 1 (superseded by s2_merge_warp_body below; kept for the benchmark's comparison).
// VEC fp16 values are handled per thread: 8 (one 16-byte load/store) when C % 8 == 0 and both
// buffers are 16-byte aligned, otherwise 1. Grid: one block per output token; the block's threads
// stride over the C/VEC channel groups of each scale.
template <int VEC>
VILA_DEVICE_INLINE void s2_merge_legacy_body(const u16* __restrict__ feat, u16* __restrict__ out,
                                      const S2MergeParams& p) {
    const int tokens_per_chunk = p.chunk_h * p.chunk_w;
    const int chunks_w = p.out_w / p.chunk_w;
    const int n_chunks = (p.out_h / p.chunk_h) * chunks_w;
    const long long row = (long long)blockIdx.x + (long long)blockIdx.y * gridDim.x;
    if (row >= (long long)p.batch * n_chunks * tokens_per_chunk) return;
    const int tok = (int)(row % tokens_per_chunk);
    const int chunk = (int)((row / tokens_per_chunk) % n_chunks);
    const int b = (int)(row / ((long long)tokens_per_chunk * n_chunks));
    const int oy = (chunk / chunks_w) * p.chunk_h + tok / p.chunk_w;  // output-grid coordinates
    const int ox = (chunk % chunks_w) * p.chunk_w + tok % p.chunk_w;
    const int C = p.channels;
    const int groups = C / VEC;
    const long long tile_elems = (long long)p.h * p.w * C;
    u16* out_row = out + row * (long long)(p.num_scales * C);

    // Unrolled over the maximum scale count so that p.tile_base[s] etc. are constant-indexed
    // (a dynamically indexed kernel-parameter array would be copied to local memory).
    VILA_UNROLL
    for (int s = 0; s < VILA_S2_MAX_SCALES; ++s) {
        if (s >= p.num_scales) break;
        const int in_h = p.grid_h[s] * p.h, in_w = p.grid_w[s] * p.w;
        int y0, y1, x0, x1;
        area_window(oy, in_h, p.out_h, y0, y1);
        area_window(ox, in_w, p.out_w, x0, x1);
        const float kh = (float)(y1 - y0), kw = (float)(x1 - x0);
        for (int g = (int)threadIdx.x; g < groups; g += (int)blockDim.x) {
            const int c = g * VEC;
            float acc[VEC];
            VILA_UNROLL
            for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
            for (int y = y0; y < y1; ++y) {
                const int ty = y / p.h, py = y % p.h;
                for (int x = x0; x < x1; ++x) {
                    const int tx = x / p.w, px = x % p.w;
                    const long long tile = p.tile_base[s] + (long long)(ty * p.grid_w[s] + tx) * p.batch + b;
                    const u16* src = feat + tile * tile_elems + (long long)(py * p.w + px) * C + c;
                    if constexpr (VEC == 8) {
                        const uint4_t v = *reinterpret_cast<const uint4_t*>(src);
                        const u32 words[4] = {v.x, v.y, v.z, v.w};
                        VILA_UNROLL
                        for (int i = 0; i < 4; ++i) {
                            acc[2 * i] += h2f((u16)(words[i] & 0xFFFFu));
                            acc[2 * i + 1] += h2f((u16)(words[i] >> 16));
                        }
                    } else {
                        VILA_UNROLL
                        for (int i = 0; i < VEC; ++i) acc[i] += h2f(src[i]);
                    }
                }
            }
            u16* dst = out_row + s * C + c;
            if constexpr (VEC == 8) {
                u32 words[4];
                VILA_UNROLL
                for (int i = 0; i < 4; ++i)
                    words[i] = (u32)f2h(acc[2 * i] / kh / kw) | ((u32)f2h(acc[2 * i + 1] / kh / kw) << 16);
                uint4_t v;
                v.x = words[0];
                v.y = words[1];
                v.z = words[2];
                v.w = words[3];
                *reinterpret_cast<uint4_t*>(dst) = v;
            } else {
                VILA_UNROLL
                for (int i = 0; i < VEC; ++i) dst[i] = f2h(acc[i] / kh / kw);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Version 2 (the default): one WARP per (output token, scale), lanes over the channel groups.
//
// Version 1 (s2_merge_legacy_body, kept as s2_merge_f16_v8_block for the GPU benchmark's old-vs-new
// row) ran at 0.24x of copy bandwidth on an H200 for NVILA 1+4+12 tiles. The SASS showed why: it
// did ~15 64-bit integer divisions per warp (row -> chunk/token in long long, 4 area windows per
// scale in long long: each a ~70-instruction subroutine, 83 CALLs in the SASS) plus 32-bit div/mod
// per window element inside the loops, for only 3 x 16 bytes of output per lane. Index math, not
// memory, set the time. Here:
//   * all index math is 32-bit (the launcher checks that every product fits), done once per warp
//     (~10 unsigned divisions), and the tile / pixel position walks the window incrementally;
//   * the scale is blockIdx.y, so a warp's per-scale parameters are uniform;
//   * each lane keeps U 16-byte groups (g, g+32, ...) and issues their U loads back to back before
//     adding, so a warp has up to U * 512 bytes in flight per window element (C = 1152: 144 groups,
//     one pass of U = 5 slots);
//   * 4 warps per block: small problems (VILA1.5-s2, 729 tokens x 2 scales) still spread over
//     every SM.
// Summation order per output element is unchanged (rows outer, columns inner, from 0, then / kh / kw),
// so the output stays bit-exact with the reference.
// ---------------------------------------------------------------------------------------------
#define VILA_S2_WARPS_PER_BLOCK 4
#define VILA_S2_SLOTS 5

template <int VEC>
struct S2Vec;
template <>
struct S2Vec<8> {
    uint4_t v;
    VILA_DEVICE_INLINE void load(const u16* src) { v = *reinterpret_cast<const uint4_t*>(src); }
    VILA_DEVICE_INLINE void add_to(float* acc) const {
        const u32 words[4] = {v.x, v.y, v.z, v.w};
        VILA_UNROLL
        for (int i = 0; i < 4; ++i) {
            acc[2 * i] += h2f((u16)(words[i] & 0xFFFFu));
            acc[2 * i + 1] += h2f((u16)(words[i] >> 16));
        }
    }
};
template <>
struct S2Vec<1> {
    u16 v;
    VILA_DEVICE_INLINE void load(const u16* src) { v = *src; }
    VILA_DEVICE_INLINE void add_to(float* acc) const { acc[0] += h2f(v); }
};

// One 16-byte global store. Spelled out because for the first slot nvcc 13.0 otherwise split the
// uint4_t store into four 4-byte stores (seen in the PTX).
VILA_DEVICE_INLINE void store_16(u16* dst, u32 a, u32 b, u32 c, u32 d) {
#if defined(VILA_HOST_SIM)
    const uint4_t v = {a, b, c, d};
    __builtin_memcpy(dst, &v, 16);
#else
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v4.u32 [g], {%1, %2, %3, %4}; }" ::"l"(dst),
                 "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
#endif
}

// out = acc / kh / kw rounded to fp16. When both window sides are powers of two (1 or 2 in every
// NVILA / VILA1.5 case), `* (1/k)` is the same correctly rounded result as `/ k` (the reciprocal is
// exact), and costs 1 instruction instead of an IEEE division (~8 plus a branch to a slow path).
template <int VEC, bool POW2>
VILA_DEVICE_INLINE void s2_store(u16* dst, const float* acc, float kh, float kw, float rh, float rw) {
    float r[VEC];
    VILA_UNROLL
    for (int i = 0; i < VEC; ++i) r[i] = POW2 ? acc[i] * rh * rw : acc[i] / kh / kw;
    if constexpr (VEC == 8) {
        store_16(dst, (u32)f2h(r[0]) | ((u32)f2h(r[1]) << 16), (u32)f2h(r[2]) | ((u32)f2h(r[3]) << 16),
                 (u32)f2h(r[4]) | ((u32)f2h(r[5]) << 16), (u32)f2h(r[6]) | ((u32)f2h(r[7]) << 16));
    } else {
        dst[0] = f2h(r[0]);
    }
}

// area_window in 32-bit unsigned arithmetic (the launcher checks (out + 1) * in + out < 2^31).
VILA_DEVICE_INLINE void area_window_u32(u32 i, u32 in, u32 out, u32& lo, u32& hi) {
    lo = (i * in) / out;
    hi = ((i + 1) * in + out - 1) / out;
}

template <int VEC>
VILA_DEVICE_INLINE void s2_merge_warp_body(const u16* __restrict__ feat, u16* __restrict__ out,
                                           const S2MergeParams& p) {
    const u32 lane = threadIdx.x & 31u;
    const u32 row = blockIdx.x * VILA_S2_WARPS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= (u32)p.rows) return;
    const u32 chunk_w = (u32)p.chunk_w, tokens_per_chunk = (u32)(p.chunk_h * p.chunk_w);
    const u32 chunks_w = (u32)p.chunks_w, n_chunks = (u32)p.n_chunks;
    const int s = (int)blockIdx.y;
    // This scale's parameters with constant indices (a run-time index would copy them to local memory).
    int tile_base = 0, grid_h = 1, grid_w = 1;
    VILA_UNROLL
    for (int i = 0; i < VILA_S2_MAX_SCALES; ++i)
        if (i == s) {
            tile_base = p.tile_base[i];
            grid_h = p.grid_h[i];
            grid_w = p.grid_w[i];
        }
    const u32 tok = row % tokens_per_chunk, rest = row / tokens_per_chunk;
    const u32 chunk = rest % n_chunks, b = rest / n_chunks;
    const u32 cy = chunk / chunks_w, cx = chunk - cy * chunks_w;
    const u32 ty_in = tok / chunk_w, tx_in = tok - ty_in * chunk_w;
    const u32 oy = cy * (u32)p.chunk_h + ty_in, ox = cx * chunk_w + tx_in;  // output-grid coordinates
    const u32 h = (u32)p.h, w = (u32)p.w, C = (u32)p.channels;
    u32 y0, y1, x0, x1;
    area_window_u32(oy, (u32)grid_h * h, (u32)p.out_h, y0, y1);
    area_window_u32(ox, (u32)grid_w * w, (u32)p.out_w, x0, x1);
    const float kh = (float)(y1 - y0), kw = (float)(x1 - x0);
    const bool pow2 = (((y1 - y0) & (y1 - y0 - 1)) | ((x1 - x0) & (x1 - x0 - 1))) == 0;
    const float rh = 1.0f / kh, rw = 1.0f / kw;  // exact when pow2
    const u32 ty0 = y0 / h, py0 = y0 - ty0 * h, tx0 = x0 / w, px0 = x0 - tx0 * w;
    const u64 tile_elems = (u64)h * w * C;
    const u32 groups = C / VEC;
    u16* out_seg = out + (u64)row * (u64)(p.num_scales * C) + (u64)s * C;

    for (u32 g0 = lane; g0 < groups; g0 += 32u * VILA_S2_SLOTS) {
        float acc[VILA_S2_SLOTS][VEC];
        VILA_UNROLL
        for (int u = 0; u < VILA_S2_SLOTS; ++u)
            VILA_UNROLL
            for (int i = 0; i < VEC; ++i) acc[u][i] = 0.0f;
        u32 ty = ty0, py = py0;
        for (u32 y = y0; y < y1; ++y) {
            u32 tx = tx0, px = px0;
            for (u32 x = x0; x < x1; ++x) {
                const u32 tile = (u32)tile_base + (ty * (u32)grid_w + tx) * (u32)p.batch + b;
                const u16* src = feat + (u64)tile * tile_elems + (u64)((py * w + px) * C) + (u64)g0 * VEC;
                S2Vec<VEC> v[VILA_S2_SLOTS];
                VILA_UNROLL  // every load first: U independent loads in flight
                for (int u = 0; u < VILA_S2_SLOTS; ++u)
                    if (g0 + 32u * u < groups) v[u].load(src + 32u * u * VEC);
                VILA_UNROLL
                for (int u = 0; u < VILA_S2_SLOTS; ++u)
                    if (g0 + 32u * u < groups) v[u].add_to(acc[u]);
                if (++px == w) {
                    px = 0;
                    ++tx;
                }
            }
            if (++py == h) {
                py = 0;
                ++ty;
            }
        }
        if (pow2) {  // warp-uniform; each branch keeps its 16-byte stores
            VILA_UNROLL
            for (int u = 0; u < VILA_S2_SLOTS; ++u)
                if (g0 + 32u * u < groups) s2_store<VEC, true>(out_seg + (u64)(g0 + 32u * u) * VEC, acc[u], kh, kw, rh, rw);
        } else {
            VILA_UNROLL
            for (int u = 0; u < VILA_S2_SLOTS; ++u)
                if (g0 + 32u * u < groups) s2_store<VEC, false>(out_seg + (u64)(g0 + 32u * u) * VEC, acc[u], kh, kw, rh, rw);
        }
    }
}

// grid (ceil(rows / VILA_S2_WARPS_PER_BLOCK), num_scales), block 32 * VILA_S2_WARPS_PER_BLOCK.
extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(32 * VILA_S2_WARPS_PER_BLOCK)
    s2_merge_f16_v8(const u16* __restrict__ feat, u16* __restrict__ out, S2MergeParams p) {
    s2_merge_warp_body<8>(feat, out, p);
}

extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(32 * VILA_S2_WARPS_PER_BLOCK)
    s2_merge_f16_v1(const u16* __restrict__ feat, u16* __restrict__ out, S2MergeParams p) {
    s2_merge_warp_body<1>(feat, out, p);
}

// Version 1, for the benchmark only: grid = one block per output token, block <= 512 threads.
extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(512)
    s2_merge_f16_v8_block(const u16* __restrict__ feat, u16* __restrict__ out, S2MergeParams p) {
    s2_merge_legacy_body<8>(feat, out, p);
}
