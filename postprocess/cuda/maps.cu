// Elementwise kernels of the scoring after the kNN: multi-scale pooling (Eq. 1), adaptive subtraction fused with
// the multi-scale fusion (Eq. 7-8), and bilinear upsampling to the map size. One thread per output element.

// Mean over the (2 radius + 1)^2 neighbourhood of each patch of x (n, h, w, c), borders: the valid neighbours.
extern "C" __global__ void box_mean(const float* __restrict__ x, float* __restrict__ out, int n, int h, int w,
                                    int c, int radius)
{
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)n * h * w * c;
    if (idx >= total) {
        return;
    }
    const int ch = (int)(idx % c);
    size_t rest = idx / c;
    const int j = (int)(rest % w);
    rest /= w;
    const int i = (int)(rest % h);
    const int image = (int)(rest / h);
    const int i0 = max(i - radius, 0), i1 = min(i + radius, h - 1);
    const int j0 = max(j - radius, 0), j1 = min(j + radius, w - 1);
    float sum = 0.0f;
    for (int a = i0; a <= i1; ++a) {
        for (int b = j0; b <= j1; ++b) {
            sum += x[(((size_t)image * h + a) * w + b) * c + ch];
        }
    }
    out[idx] = sum / (float)((i1 - i0 + 1) * (j1 - j0 + 1));
}

// out[p] = sum_s weights[s] * (full[s, p] - alpha * normal[s, p] * (normal[s, p] <= tau[s])), p < size.
extern "C" __global__ void subtract_and_fuse(const float* __restrict__ full, const float* __restrict__ normal,
                                             const float* __restrict__ tau, const float* __restrict__ weights,
                                             float* __restrict__ out, float alpha, int scales, long long size)
{
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= size) {
        return;
    }
    float total = 0.0f;
    for (int s = 0; s < scales; ++s) {
        const float b = normal[(size_t)s * size + p];
        const float kept = b <= tau[s] ? b : 0.0f;
        total += weights[s] * (full[(size_t)s * size + p] - alpha * kept);
    }
    out[p] = total;
}

// Bilinear upsampling (half-pixel centres, torch's align_corners=False) of x (n, h, w) to out (n, height, width).
extern "C" __global__ void upsample_bilinear(const float* __restrict__ x, float* __restrict__ out, int n, int h,
                                             int w, int height, int width)
{
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * height * width) {
        return;
    }
    const int X = (int)(idx % width);
    const int Y = (int)((idx / width) % height);
    const int image = (int)(idx / ((size_t)width * height));
    const float sy = fmaxf((Y + 0.5f) * ((float)h / height) - 0.5f, 0.0f);
    const float sx = fmaxf((X + 0.5f) * ((float)w / width) - 0.5f, 0.0f);
    const int y0 = min((int)floorf(sy), h - 1), x0 = min((int)floorf(sx), w - 1);
    const int y1 = min(y0 + 1, h - 1), x1 = min(x0 + 1, w - 1);
    const float fy = sy - y0, fx = sx - x0;
    const float* g = x + (size_t)image * h * w;
    const float top = (1.0f - fx) * g[y0 * w + x0] + fx * g[y0 * w + x1];
    const float bottom = (1.0f - fx) * g[y1 * w + x0] + fx * g[y1 * w + x1];
    out[idx] = (1.0f - fy) * top + fy * bottom;
}
