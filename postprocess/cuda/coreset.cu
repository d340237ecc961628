// One step of greedy k-center (farthest point) selection in each group, fused with its argmax: fold the newest
// centre into every point's squared distance to the chosen set, and pick the farthest point as the next centre.
// One block per group of CORESET_THREADS threads (set by postprocess/cuda_kernels.py, which launches it with that
// many). Ties go to the lowest index, as numpy.argmax does. The centre's own distance becomes -1 (as
// kernels.greedy_coreset marks a chosen point), so that points identical to it are picked before it is picked again.
//   points (groups, n_points, dim) float, sq_norm (groups, n_points), min_dist (groups, n_points) in/out,
//   centre (groups) the newest centre, next (groups) out.
#ifndef CORESET_THREADS
#error "CORESET_THREADS comes from postprocess/cuda_kernels.py (COMPILE_DEFINES)"
#endif
static_assert(CORESET_THREADS >= 1 && CORESET_THREADS <= 1024 && (CORESET_THREADS & (CORESET_THREADS - 1)) == 0,
              "the argmax tree halves the block: a power of two up to 1024 threads");

extern "C" __global__ void coreset_step(const float* __restrict__ points, const float* __restrict__ sq_norm,
                                        float* __restrict__ min_dist, const long long* __restrict__ centre,
                                        long long* __restrict__ next, int n_points, int dim)
{
    __shared__ float best_value[CORESET_THREADS];
    __shared__ int best_index[CORESET_THREADS];
    const int group = blockIdx.x;
    const int t = threadIdx.x;
    const float* pts = points + (size_t)group * n_points * dim;
    const long long c = centre[group];
    const float* centre_point = pts + (size_t)c * dim;
    const float centre_norm = sq_norm[(size_t)group * n_points + c];
    float best = -1.0f;
    int best_i = 0;
    for (int p = t; p < n_points; p += CORESET_THREADS) {
        const float* x = pts + (size_t)p * dim;
        float dot = 0.0f;
        for (int d = 0; d < dim; ++d) {
            dot += x[d] * centre_point[d];
        }
        const size_t at = (size_t)group * n_points + p;
        const float dist = fmaxf(sq_norm[at] - 2.0f * dot + centre_norm, 0.0f);
        const float current = p == c ? -1.0f : fminf(min_dist[at], dist);
        min_dist[at] = current;
        if (current > best) {
            best = current;
            best_i = p;
        }
    }
    best_value[t] = best;
    best_index[t] = best_i;
    __syncthreads();
    for (int stride = CORESET_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            const float other = best_value[t + stride];
            const int other_i = best_index[t + stride];
            if (other > best_value[t] || (other == best_value[t] && other_i < best_index[t])) {
                best_value[t] = other;
                best_index[t] = other_i;
            }
        }
        __syncthreads();
    }
    if (t == 0) {
        next[group] = best_index[0];
    }
}
