// Cosine kNN against a full bank, fused: FP16 tensor-core tiles (WMMA 16x16x16, FP32 accumulation) of
// query . bank-entry products, reduced on the fly to the best match per bank image, then the interval average
// over the k nearest bank images. No similarity block ever reaches global memory.
//
// Layouts (row-major, contiguous):
//   queries  (rows_padded, channels) half, rows_padded = rows rounded up to 16 (padding rows are zeros)
//   bank     (n_images * m_padded, channels) half; each image's m entries padded to m_padded (a multiple of 16)
//            with copies of its first entry, which cannot change a maximum
//   minima   (rows, n_images) float: 1 - max_j cos(query, entry j of the image)
// channels is a multiple of 16 (the caller pads with zeros, which leave every product unchanged).
#include <mma.h>
#include <cuda_fp16.h>

using namespace nvcuda;

#define KNN_WARPS 4

extern "C" __global__ void knn_image_min(const __half* __restrict__ queries, const __half* __restrict__ bank,
                                         float* __restrict__ minima, int rows, int channels, int n_images,
                                         int m_padded)
{
    __shared__ float tile[KNN_WARPS][16][16];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * KNN_WARPS + warp) * 16;
    const int image = blockIdx.y;
    if (row0 >= rows) {
        return;  // no block-wide synchronisation below: a warp may leave alone
    }
    const __half* a_base = queries + (size_t)row0 * channels;
    const __half* image_base = bank + (size_t)image * m_padded * channels;
    float best = -INFINITY;  // lanes 0..15: the running best product of row row0 + lane
    for (int e0 = 0; e0 < m_padded; e0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        const __half* b_base = image_base + (size_t)e0 * channels;
        for (int c0 = 0; c0 < channels; c0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            // entries are rows of the bank: read as a column-major K x N block, column n = entry e0 + n
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
            wmma::load_matrix_sync(a, a_base + c0, channels);
            wmma::load_matrix_sync(b, b_base + c0, channels);
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(&tile[warp][0][0], acc, 16, wmma::mem_row_major);
        __syncwarp();
        if (lane < 16) {
            for (int j = 0; j < 16; ++j) {
                best = fmaxf(best, tile[warp][lane][j]);
            }
        }
        __syncwarp();
    }
    const int row = row0 + lane;
    if (lane < 16 && row < rows) {
        minima[(size_t)row * n_images + image] = 1.0f - best;
    }
}

#define MAX_K 64

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
        nearest[i] = INFINITY;
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
