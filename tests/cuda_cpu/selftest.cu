// Kernels that break CUDA's rules on purpose, one rule each, for tests/test_cuda_cpu.py: the harness (and the
// sanitizers) must report every one of them. Not part of the product.
#include <mma.h>
#include <cuda_fp16.h>

using namespace nvcuda;

// float -> half -> float, and the half's bits, for every input.
extern "C" __global__ void half_round_trip(const float* in, unsigned short* bits, float* back, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const __half h = __float2half(in[i]);
        bits[i] = h.bits;
        back[i] = __half2float(h);
    }
}

// Each thread writes its value to shared memory and reads its mirror's: correct only with the barrier between.
extern "C" __global__ void mirror(const float* in, float* out, int with_barrier)
{
    __shared__ float values[64];
    const int t = threadIdx.x;
    values[t] = in[blockIdx.x * blockDim.x + t];
    if (with_barrier) {
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + t] = values[blockDim.x - 1 - t];
}

// Half a warp waits at the warp's barrier, the other half at the block's: neither is ever complete.
extern "C" __global__ void split_barrier(float* out)
{
    if (threadIdx.x % 32 < 16) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// One value per thread, launched with more threads than values.
extern "C" __global__ void unguarded_write(float* out)
{
    out[threadIdx.x] = 1.0f;
}

// A WMMA load from a pointer one element past a 256-bit boundary.
extern "C" __global__ void misaligned_load(float* out)
{
    __shared__ __align__(32) __half tile[16 * 16 + 16];
    for (int i = threadIdx.x; i < 16 * 16 + 16; i += blockDim.x) {
        tile[i] = __float2half(1.0f);
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::load_matrix_sync(a, tile + 1, 16);
    out[threadIdx.x] = 0.0f;
}

// Integer arguments of two widths, to check that the launcher refuses the wrong one.
extern "C" __global__ void widths(long long* out, int a, long long b, float c)
{
    out[0] = a + b + (long long)c;
}
