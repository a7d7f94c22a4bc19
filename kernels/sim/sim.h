// Host simulator of the tiny subset of CUDA the vila-edge kernels use, so that the kernel source
// can be compiled by g++ and run on a CPU (tests/test_kernels.py). Each CUDA thread of a block is
// a std::thread; __syncthreads and warp-collective operations are barriers. Blocks run one after
// another, so `static` locals stand in for __shared__ memory. It is slow and only meant for small
// problems; it checks logic (indexing, tiling, masks, MMA fragment layouts), not performance, and
// not the timing of asynchronous copies (which it performs synchronously).
#pragma once

#include <cstddef>

struct SimDim3 {
    unsigned x, y, z;
};

extern thread_local SimDim3 threadIdx;
extern thread_local SimDim3 blockIdx;
extern SimDim3 blockDim;
extern SimDim3 gridDim;

void __syncthreads();
float sim_shfl_xor(float v, int lane_mask);
void sim_mma_f16_16816(float d[4], const unsigned a[4], const unsigned b[2]);
void sim_mma_e4m3_16832(float d[4], const unsigned a[4], const unsigned b[2]);
void sim_mma_e5m2_16832(float d[4], const unsigned a[4], const unsigned b[2]);
unsigned char* sim_dynamic_smem();

unsigned short sim_float_to_half_rn(float f);
float sim_half_to_float(unsigned short h);
unsigned short sim_float_to_bf16_rn(float f);
unsigned sim_hmul2_by_256(unsigned h2);
[[noreturn]] void sim_trap();

#define __global__
#define __shared__ static
#define __trap() sim_trap()
