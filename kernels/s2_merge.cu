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
};

// Source window [lo, hi) of output index i when resampling `in` samples to `out` samples:
// [floor(i*in/out), ceil((i+1)*in/out)) -- PyTorch's start_index / end_index.
VILA_DEVICE_INLINE void area_window(int i, int in, int out, int& lo, int& hi) {
    lo = (int)(((long long)i * in) / out);
    hi = (int)(((long long)(i + 1) * in + out - 1) / out);
}

// VEC fp16 values are handled per thread: 8 (one 16-byte load/store) when C % 8 == 0 and both
// buffers are 16-byte aligned, otherwise 1. Grid: one block per output token; the block's threads
// stride over the C/VEC channel groups of each scale.
template <int VEC>
VILA_DEVICE_INLINE void s2_merge_body(const u16* __restrict__ feat, u16* __restrict__ out,
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

extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(512)
    s2_merge_f16_v8(const u16* __restrict__ feat, u16* __restrict__ out, S2MergeParams p) {
    s2_merge_body<8>(feat, out, p);
}

extern "C" __global__ void VILA_GLOBAL_LAUNCH_BOUNDS(512)
    s2_merge_f16_v1(const u16* __restrict__ feat, u16* __restrict__ out, S2MergeParams p) {
    s2_merge_body<1>(feat, out, p);
}
