// Cosine kNN against a full bank, fused: FP16 tensor-core tiles (WMMA 16x16x16, FP32 accumulation) of
// query . bank-entry products, reduced on the fly to the best match per bank image, then the interval average
// over the k nearest bank images. No similarity block ever reaches global memory, and nothing is copied or padded
// beforehand: each warp stages its 16x16 tiles in shared memory, converting to half and filling zeros past the ends.
//
// Layouts (row-major, contiguous): queries (rows, channels), float or half; bank (n_images * per_image, channels),
// float or half, image b's entries at rows [b * per_image, (b + 1) * per_image); minima (rows, n_images) float:
// 1 - max_j (query . entry j of the image).
#include <mma.h>
#include <cuda_fp16.h>

using namespace nvcuda;

// Set by postprocess/cuda_kernels.py (COMPILE_DEFINES) for every compiler that builds this file: the launch grid
// there is computed from the same values.
#if !defined(TILE) || !defined(KNN_WARPS) || !defined(MAX_K)
#error "TILE, KNN_WARPS and MAX_K come from postprocess/cuda_kernels.py (COMPILE_DEFINES)"
#endif
static_assert(TILE == 16, "WMMA 16x16x16 tiles: stage_tile moves 8 values per lane of a 16 x 16 tile");
static_assert(MAX_K >= 1 && KNN_WARPS >= 1, "interval k and warps per block are positive");

// +infinity as a bit pattern: NVRTC, CuPy's default compiler, has no math headers and so no INFINITY
#define POSITIVE_INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ __half to_half(float v) { return __float2half(v); }
__device__ __forceinline__ __half to_half(__half v) { return v; }

// Copy a 16 x 16 block (16 rows from `first`, 16 channels from c0) into shared memory as half, row by row; rows at
// or past `row_end` and channels at or past `channels` read as zero. Each of the 32 lanes moves 8 values.
template <typename T>
__device__ __forceinline__ void stage_tile(__half* tile, const T* __restrict__ src, long long first, long long row_end,
                                           int channels, int c0, int lane)
{
    const int r = lane / 2;
    const int c = (lane % 2) * 8;
    const long long row = first + r;
    for (int t = 0; t < 8; ++t) {
        const int ch = c0 + c + t;
        tile[r * TILE + c + t] = (row < row_end && ch < channels) ? to_half(src[row * channels + ch]) : __float2half(0.0f);
    }
}

#define ENTRY_TILES 4  // entry tiles per pass: each staged query tile feeds four products

template <typename TQ, typename TB>
__device__ void knn_image_min_impl(const TQ* __restrict__ queries, const TB* __restrict__ bank,
                                   float* __restrict__ minima, int rows, int channels, int n_images, int per_image,
                                   int image0)
{
    __shared__ __align__(32) __half a_tile[KNN_WARPS][TILE * TILE];
    __shared__ __align__(32) __half b_tile[KNN_WARPS][ENTRY_TILES][TILE * TILE];
    __shared__ __align__(32) float products[KNN_WARPS][TILE * TILE];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * KNN_WARPS + warp) * TILE;
    const int image = image0 + blockIdx.y;  // the grid's y holds at most 65535 images: launched in slices of them
    if (row0 >= rows) {
        return;  // no block-wide synchronisation below: a warp may leave alone
    }
    const long long image_first = (long long)image * per_image;
    const long long image_end = image_first + per_image;
    float best = -POSITIVE_INFINITY;  // lanes 0..15: the running best product of row row0 + lane
    for (int e0 = 0; e0 < per_image; e0 += TILE * ENTRY_TILES) {
        wmma::fragment<wmma::accumulator, TILE, TILE, TILE, float> acc[ENTRY_TILES];
        for (int t = 0; t < ENTRY_TILES; ++t) {
            wmma::fill_fragment(acc[t], 0.0f);
        }
        for (int c0 = 0; c0 < channels; c0 += TILE) {
            stage_tile(a_tile[warp], queries, row0, rows, channels, c0, lane);
            for (int t = 0; t < ENTRY_TILES; ++t) {
                stage_tile(b_tile[warp][t], bank, image_first + e0 + TILE * t, image_end, channels, c0, lane);
            }
            __syncwarp();
            wmma::fragment<wmma::matrix_a, TILE, TILE, TILE, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, a_tile[warp], TILE);
            for (int t = 0; t < ENTRY_TILES; ++t) {
                // b_tile holds 16 entries x 16 channels: as a column-major K x N block, column n is an entry
                wmma::fragment<wmma::matrix_b, TILE, TILE, TILE, __half, wmma::col_major> b;
                wmma::load_matrix_sync(b, b_tile[warp][t], TILE);
                wmma::mma_sync(acc[t], a, b, acc[t]);
            }
            __syncwarp();
        }
        for (int t = 0; t < ENTRY_TILES; ++t) {
            wmma::store_matrix_sync(products[warp], acc[t], TILE, wmma::mem_row_major);
            __syncwarp();
            if (lane < TILE) {
                // entries past the image's end (zeros, or the next image's) are not its own
                const int valid = min(TILE, per_image - (e0 + TILE * t));
                for (int j = 0; j < valid; ++j) {
                    best = fmaxf(best, products[warp][lane * TILE + j]);
                }
            }
            __syncwarp();
        }
    }
    const int row = row0 + lane;
    if (lane < TILE && row < rows) {
        minima[(size_t)row * n_images + image] = 1.0f - best;
    }
}

extern "C" __global__ void knn_image_min_f32_f32(const float* queries, const float* bank, float* minima, int rows,
                                                 int channels, int n_images, int per_image, int image0)
{
    knn_image_min_impl(queries, bank, minima, rows, channels, n_images, per_image, image0);
}

extern "C" __global__ void knn_image_min_f32_f16(const float* queries, const __half* bank, float* minima, int rows,
                                                 int channels, int n_images, int per_image, int image0)
{
    knn_image_min_impl(queries, bank, minima, rows, channels, n_images, per_image, image0);
}

extern "C" __global__ void knn_image_min_f16_f16(const __half* queries, const __half* bank, float* minima, int rows,
                                                 int channels, int n_images, int per_image, int image0)
{
    knn_image_min_impl(queries, bank, minima, rows, channels, n_images, per_image, image0);
}

// Mean of the k smallest per-image minima of each row, the row's own image left out (k <= MAX_K).
extern "C" __global__ void interval_topk_mean(const float* __restrict__ minima, const long long* __restrict__ row_ids,
                                              const long long* __restrict__ image_ids, float* __restrict__ out,
                                              int rows, int n_images, int k)
{
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) {
        return;
    }
    float nearest[MAX_K];  // sorted ascending
    for (int i = 0; i < k; ++i) {
        nearest[i] = POSITIVE_INFINITY;
    }
    const long long own = row_ids[row];
    const float* values = minima + (size_t)row * n_images;
    for (int b = 0; b < n_images; ++b) {
        const float v = values[b];
        if (image_ids[b] == own || !(v < nearest[k - 1])) {
            continue;
        }
        int i = k - 1;
        while (i > 0 && nearest[i - 1] > v) {
            nearest[i] = nearest[i - 1];
            --i;
        }
        nearest[i] = v;
    }
    float total = 0.0f;
    for (int i = 0; i < k; ++i) {
        total += nearest[i];
    }
    out[row] = total / k;
}
