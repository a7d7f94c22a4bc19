// Host simulator runtime + the kernel sources compiled for it (see sim.h). Built by
// `make -C kernels sim` into build/libvila_kernels_sim.so and driven from Python through
// sim_launch(), which takes the same void** parameter array as cuLaunchKernel.
#include "sim.h"

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

thread_local SimDim3 threadIdx;
thread_local SimDim3 blockIdx;
SimDim3 blockDim;
SimDim3 gridDim;

namespace {

class Barrier {
  public:
    void reset(int n) {
        count_ = n;
        waiting_ = 0;
        generation_ = 0;
    }
    void wait() {
        std::unique_lock<std::mutex> lock(mu_);
        const unsigned long gen = generation_;
        if (++waiting_ == count_) {
            waiting_ = 0;
            ++generation_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen != generation_; });
        }
    }

  private:
    std::mutex mu_;
    std::condition_variable cv_;
    int count_ = 0;
    int waiting_ = 0;
    unsigned long generation_ = 0;
};

struct WarpState {
    Barrier bar;
    unsigned a[32][4];
    unsigned b[32][2];
    float f[32];
};

Barrier g_block_barrier;
std::vector<WarpState*> g_warps;
std::vector<unsigned char> g_dyn_smem;

int linear_tid() {
    return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

WarpState& my_warp() { return *g_warps[linear_tid() / 32]; }

float e4m3_to_float(unsigned char v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    float mag = e == 0 ? (float)m * (1.0f / 512.0f) : (1.0f + (float)m / 8.0f) * std::ldexp(1.0f, e - 7);
    if (e == 15 && m == 7) mag = NAN;
    return s ? -mag : mag;
}

float e5m2_to_float(unsigned char v) {
    const int s = v >> 7, e = (v >> 2) & 31, m = v & 3;
    float mag = e == 0 ? (float)m * (1.0f / 65536.0f) : (1.0f + (float)m / 4.0f) * std::ldexp(1.0f, e - 15);
    if (e == 31) mag = m == 0 ? INFINITY : NAN;
    return s ? -mag : mag;
}

float half_bits_to_float(unsigned short h) { return sim_half_to_float(h); }

}  // namespace

void __syncthreads() { g_block_barrier.wait(); }

unsigned char* sim_dynamic_smem() { return g_dyn_smem.data(); }

void sim_trap() {
    std::fprintf(stderr, "sim: __trap() reached\n");
    std::abort();
}

float sim_shfl_xor(float v, int lane_mask) {
    WarpState& w = my_warp();
    const int lane = linear_tid() % 32;
    w.f[lane] = v;
    w.bar.wait();
    const float o = w.f[lane ^ lane_mask];
    w.bar.wait();
    return o;
}

// mma.m16n8k16 f16: A regs {row g | g+8} x {k 2t..2t+1 | 8+2t..}, reg r -> row g + 8*(r&1),
// k-half (r>>1); B reg r -> k 8r + 2t..; C: c0,c1 row g cols 2t,2t+1; c2,c3 row g+8.
void sim_mma_f16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    WarpState& w = my_warp();
    const int lane = linear_tid() % 32;
    std::memcpy(w.a[lane], a, 16);
    std::memcpy(w.b[lane], b, 8);
    w.bar.wait();
    auto A = [&](int row, int k) {
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        const int l = (row % 8) * 4 + (k % 8) / 2;
        return half_bits_to_float((unsigned short)(w.a[l][reg] >> (16 * (k % 2))));
    };
    auto B = [&](int k, int n) {
        const int reg = k >= 8 ? 1 : 0;
        const int l = n * 4 + (k % 8) / 2;
        return half_bits_to_float((unsigned short)(w.b[l][reg] >> (16 * (k % 2))));
    };
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
        d[i] += s;
    }
    w.bar.wait();
}

// mma.m16n8k32 e4m3 / e5m2: A reg r -> row g + 8*(r&1), k 16*(r>>1) + 4t + byte; B reg r -> k 16r + 4t
// + byte, col g. C as above.
template <float (*DECODE)(unsigned char)>
void sim_mma_fp8_16832(float d[4], const unsigned a[4], const unsigned b[2]) {
    WarpState& w = my_warp();
    const int lane = linear_tid() % 32;
    std::memcpy(w.a[lane], a, 16);
    std::memcpy(w.b[lane], b, 8);
    w.bar.wait();
    auto A = [&](int row, int k) {
        const int reg = (row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
        const int l = (row % 8) * 4 + (k % 16) / 4;
        return DECODE((unsigned char)(w.a[l][reg] >> (8 * (k % 4))));
    };
    auto B = [&](int k, int n) {
        const int reg = k >= 16 ? 1 : 0;
        const int l = n * 4 + (k % 16) / 4;
        return DECODE((unsigned char)(w.b[l][reg] >> (8 * (k % 4))));
    };
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 32; ++k) s += A(row, k) * B(k, col);
        d[i] += s;
    }
    w.bar.wait();
}

void sim_mma_e4m3_16832(float d[4], const unsigned a[4], const unsigned b[2]) {
    sim_mma_fp8_16832<e4m3_to_float>(d, a, b);
}

void sim_mma_e5m2_16832(float d[4], const unsigned a[4], const unsigned b[2]) {
    sim_mma_fp8_16832<e5m2_to_float>(d, a, b);
}

// ---- bit-exact conversions (round to nearest even) ----
unsigned short sim_float_to_half_rn(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    const unsigned sign = (u >> 16) & 0x8000u;
    unsigned a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);  // NaN
    if (a >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {
        // fp16 subnormal (or zero): value = m * 2^-24, m = RNE(|f| * 2^24)
        if (a < 0x33000000u) return (unsigned short)sign;  // < 2^-25: rounds to 0
        const unsigned sig = (a & 0x7FFFFFu) | 0x800000u;
        const int e = (int)(a >> 23) - 127;  // -25 .. -15
        const int shift = -e - 1;            // sig * 2^(e-23+24) = sig >> (-(e+1))
        unsigned q = sig >> shift;
        const unsigned rem = sig & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return (unsigned short)(sign | q);
    }
    const unsigned e = ((a >> 23) - 127 + 15);
    unsigned q = (e << 10) | ((a >> 13) & 0x3FFu);
    const unsigned rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}

float sim_half_to_float(unsigned short h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float mag;
    if (e == 0) mag = std::ldexp((float)m, -24);
    else if (e == 31) mag = m ? NAN : INFINITY;
    else mag = std::ldexp(1.0f + (float)m / 1024.0f, e - 15);
    return s ? -mag : mag;
}

unsigned short sim_float_to_bf16_rn(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

unsigned sim_hmul2_by_256(unsigned h2) {
    unsigned out = 0;
    for (int i = 0; i < 2; ++i) {
        const float v = sim_half_to_float((unsigned short)(h2 >> (16 * i))) * 256.0f;
        out |= (unsigned)sim_float_to_half_rn(v) << (16 * i);
    }
    return out;
}

// ---- the kernels, compiled for the simulator ----
#include "../s2_merge.cu"
#include "../fp8_gemm.cu"

namespace {

using Trampoline = void (*)(void** params);

template <typename... Args, std::size_t... I>
void call_with(void (*f)(Args...), void** params, std::index_sequence<I...>) {
    f(*static_cast<Args*>(params[I])...);
}

template <auto F>
struct Tramp;
template <typename... Args, void (*F)(Args...)>
struct Tramp<F> {
    static void run(void** params) { call_with(F, params, std::index_sequence_for<Args...>{}); }
};

#define VILA_SIM_KERNEL(name) {#name, &Tramp<&name>::run}

const std::map<std::string, Trampoline>& registry() {
    static const std::map<std::string, Trampoline> r = {
#include "../kernel_list.inc"
    };
    return r;
}

}  // namespace

extern "C" int sim_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, unsigned smem_bytes, void** params) {
    const auto it = registry().find(name);
    if (it == registry().end()) return 1;
    const Trampoline fn = it->second;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const int nthreads = (int)(bx * by * bz);
    const int nwarps = (nthreads + 31) / 32;
    g_dyn_smem.assign(smem_bytes + 16, 0xA5);  // garbage, like real shared memory
    for (auto* w : g_warps) delete w;
    g_warps.clear();
    for (int i = 0; i < nwarps; ++i) {
        g_warps.push_back(new WarpState());
        g_warps.back()->bar.reset(i == nwarps - 1 && nthreads % 32 ? nthreads % 32 : 32);
    }
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                g_block_barrier.reset(nthreads);
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (int t = 0; t < nthreads; ++t) {
                    threads.emplace_back([=] {
                        blockIdx = {x, y, z};
                        threadIdx = {(unsigned)t % bx, ((unsigned)t / bx) % by, (unsigned)t / (bx * by)};
                        fn(params);
                    });
                }
                for (auto& th : threads) th.join();
            }
    return 0;
}

extern "C" const char* sim_kernel_names() {
    static std::string names;
    if (names.empty())
        for (const auto& kv : registry()) names += kv.first + "\n";
    return names.c_str();
}

// Element-wise access to the conversion helpers of common.cuh, for unit tests.
extern "C" void sim_convert(int op, const void* in, void* out, long long n) {
    for (long long i = 0; i < n; ++i) {
        switch (op) {
            case 0: ((unsigned char*)out)[i] = f32_to_e4m3_satfinite(((const float*)in)[i]); break;
            case 1: ((unsigned short*)out)[i] = f2h(((const float*)in)[i]); break;
            case 2: ((unsigned short*)out)[i] = f2bf(((const float*)in)[i]); break;
            case 3: ((float*)out)[i] = h2f(((const unsigned short*)in)[i]); break;
            case 4: {  // two e4m3 bytes -> fp16x2
                ((unsigned*)out)[i] = e4m3x2_to_f16x2(((const unsigned short*)in)[i]);
                break;
            }
            case 5: ((unsigned char*)out)[i] = f32_to_e5m2_satfinite(((const float*)in)[i]); break;
            case 6: {  // two e5m2 bytes -> fp16x2
                ((unsigned*)out)[i] = e5m2x2_to_f16x2(((const unsigned short*)in)[i]);
                break;
            }
            default: break;
        }
    }
}
