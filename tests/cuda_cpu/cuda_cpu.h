// The CUDA our kernels use, on the CPU: force-included (g++ -include) before an unchanged postprocess/cuda/*.cu.
//
// Each block's threads are real threads that meet at real barriers (__syncthreads, __syncwarp), so a missing
// barrier is a real data race: ThreadSanitizer reports it, and the serial schedules below make it change the
// result. Blocks run one after another on one pool of blockDim threads; __shared__ arrays are function statics,
// one copy per block at a time. WMMA input fragments hold the whole 16x16 tile in every lane (each lane computes the
// product's share it owns, FP32 accumulation), and a store writes each lane's share only, as the hardware does.
//
// Schedules (LaunchConfig.order): concurrent (the OS decides), forward (one thread at a time, lowest index first,
// switching only at barriers), reverse (highest first), shuffled (a seeded random order per block). A write and a
// read of one location by two threads with no barrier between them happen in opposite orders under forward and
// reverse, so one of the two sees the other value. A barrier that some threads never reach is reported as a
// deadlock, not a hang. Faults (misaligned WMMA pointer, bad ldm, partial warp masks) are reported with the
// block and thread.
#pragma once

#include <math.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// --- half precision: IEEE binary16 storage, conversions rounded to nearest even (the compiler's _Float16) ---
struct __half {
    unsigned short bits;
};
inline __half __float2half(float value) {
    const _Float16 h = static_cast<_Float16>(value);
    __half out;
    std::memcpy(&out.bits, &h, sizeof out.bits);
    return out;
}
inline float __half2float(__half value) {
    _Float16 h;
    std::memcpy(&h, &value.bits, sizeof h);
    return static_cast<float>(h);
}
inline float __int_as_float(int bits) {
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

namespace cuda_cpu {

enum Order { CONCURRENT = 0, FORWARD = 1, REVERSE = 2, SHUFFLED = 3 };

// Mirrored by tests/cuda_cpu/harness.py (ctypes): keep the field order.
struct LaunchConfig {
    unsigned int grid[3];
    unsigned int block[3];
    unsigned long long shared_mem;
    int order;
    unsigned long long seed;
};

// Thrown inside a kernel thread once the block has failed: unwinds the kernel, the thread then counts as exited.
struct Unwind {};

class BlockRun {
  public:
    BlockRun(int n_threads, int order, unsigned long long seed)
        : n(n_threads), order(order), wake(new std::condition_variable[n_threads]) {
        const int warps = (n + 31) / 32;
        live.assign(1 + warps, 0);
        arrived.assign(1 + warps, 0);
        live[0] = n;
        for (int t = 0; t < n; ++t) {
            live[1 + t / 32] += 1;
        }
        state.assign(n, READY);
        waiting_at.assign(n, -1);
        rank.resize(n);
        std::iota(rank.begin(), rank.end(), 0);
        if (order == REVERSE) {
            std::reverse(rank.begin(), rank.end());
        } else if (order == SHUFFLED) {
            std::mt19937_64 rng(seed);
            std::shuffle(rank.begin(), rank.end(), rng);
        }
        active = n;
        if (serial()) {
            baton = pick();
        }
    }

    bool serial() const { return order != CONCURRENT; }

    // A kernel thread starts only when it may run.
    void enter(int tid) {
        if (!serial()) {
            // Concurrent: every thread of the block passes this gate before any runs the kernel, on a mutex of its
            // own. Without it a thread started late by the OS could take a lock another thread released after its
            // kernel body, which orders the two bodies and hides a race from ThreadSanitizer.
            std::unique_lock<std::mutex> gate(gate_m);
            if (++entered == n) {
                gate_cv.notify_all();
            } else {
                gate_cv.wait(gate, [&] { return entered == n; });
            }
            return;
        }
        std::unique_lock<std::mutex> lock(m);
        wake[tid].wait(lock, [&] { return failed || !serial() || baton == tid; });
        if (failed) {
            throw Unwind();
        }
    }

    // __syncthreads (barrier 0) or __syncwarp (barrier 1 + warp).
    void arrive(int tid, int barrier) {
        std::unique_lock<std::mutex> lock(m);
        if (failed) {
            throw Unwind();
        }
        arrived[barrier] += 1;
        if (arrived[barrier] == live[barrier]) {
            release(barrier);
        } else {
            state[tid] = WAITING;
            waiting_at[tid] = barrier;
            active -= 1;
        }
        hand_on();
        wake[tid].wait(lock, [&] { return failed || (state[tid] == READY && (!serial() || baton == tid)); });
        if (failed) {
            throw Unwind();
        }
    }

    // The thread returned (or unwound): it no longer holds back the barriers it belonged to.
    void exit(int tid) {
        std::unique_lock<std::mutex> lock(m);
        state[tid] = DONE;
        active -= 1;
        for (int barrier : {0, 1 + tid / 32}) {
            live[barrier] -= 1;
            if (arrived[barrier] > 0 && arrived[barrier] == live[barrier]) {
                release(barrier);
            }
        }
        hand_on();
    }

    void fail(const std::string& why) {
        std::unique_lock<std::mutex> lock(m);
        fail_locked(why);
    }

    bool failed = false;
    std::string message;

  private:
    enum State { READY, WAITING, DONE };

    void release(int barrier) {
        arrived[barrier] = 0;
        for (int t = 0; t < n; ++t) {
            if (state[t] == WAITING && waiting_at[t] == barrier) {
                state[t] = READY;
                waiting_at[t] = -1;
                active += 1;
                if (!serial()) {
                    wake[t].notify_one();
                }
            }
        }
    }

    // The next thread to run (serial schedules), or -1 when none is ready.
    int pick() const {
        for (int t : rank) {
            if (state[t] == READY) {
                return t;
            }
        }
        return -1;
    }

    void hand_on() {
        if (serial()) {
            baton = pick();
            if (baton >= 0) {
                wake[baton].notify_one();
            }
        }
        if (active == 0 && !failed) {
            int at_block = 0, at_warp = 0, done = 0;
            for (int t = 0; t < n; ++t) {
                done += state[t] == DONE;
                at_block += state[t] == WAITING && waiting_at[t] == 0;
                at_warp += state[t] == WAITING && waiting_at[t] > 0;
            }
            if (at_block + at_warp > 0) {
                fail_locked("deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads(), " +
                            std::to_string(at_warp) + " at __syncwarp(), " + std::to_string(done) +
                            " have exited (a barrier that some threads of the block or warp never reach)");
            }
        }
    }

    void fail_locked(const std::string& why) {
        if (!failed) {
            failed = true;
            message = why;
        }
        for (int t = 0; t < n; ++t) {
            wake[t].notify_one();
        }
    }

    int n;
    int order;
    std::mutex m;
    std::mutex gate_m;  // the concurrent start gate's own (see enter)
    std::condition_variable gate_cv;
    int entered = 0;
    std::unique_ptr<std::condition_variable[]> wake;  // one per thread: a hand-over wakes one thread, not all
    std::vector<int> live, arrived, state, waiting_at, rank;
    int active = 0;
    int baton = -1;
};

inline thread_local BlockRun* current_block = nullptr;
inline thread_local int current_thread = 0;

inline std::string where() {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ") thread " + std::to_string(current_thread);
}

// A fault in kernel code: recorded for the launch's error, then the thread unwinds.
[[noreturn]] inline void fault(const std::string& what) {
    current_block->fail(what + " (" + where() + ")");
    throw Unwind();
}

inline int lane() { return current_thread % 32; }

}  // namespace cuda_cpu

inline void __syncthreads() { cuda_cpu::current_block->arrive(cuda_cpu::current_thread, 0); }

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    if (mask != 0xffffffffu) {
        cuda_cpu::fault("__syncwarp with a partial mask is not emulated");
    }
    cuda_cpu::current_block->arrive(cuda_cpu::current_thread, 1 + cuda_cpu::current_thread / 32);
}

// --- WMMA: the shapes and types knn.cu uses (16x16x16, half inputs, float accumulator) ---
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
    float value[rows * cols];  // the whole logical matrix, row-major, in every lane
    float& at(int r, int c) { return value[r * cols + c]; }
    const float& at(int r, int c) const { return value[r * cols + c]; }
};

namespace detail {
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }

template <typename T>
inline void check_pointer(const T* p, unsigned ldm, const char* op) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
        cuda_cpu::fault(std::string(op) + ": the pointer is not 256-bit aligned");
    }
    if ((ldm * sizeof(T)) % 16 != 0) {
        cuda_cpu::fault(std::string(op) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes");
    }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
    for (float& x : f.value) {
        x = detail::as_float(v);
    }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout");
    static_assert(std::is_same<T, P>::value, "fragment and memory element types differ");
    detail::check_pointer(p, ldm, "load_matrix_sync");
    using F = fragment<Use, M, N, K, T, Layout>;
    constexpr bool column_major = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < F::rows; ++r) {
        for (int c = 0; c < F::cols; ++c) {
            f.at(r, c) = detail::as_float(column_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]);
        }
    }
}

// An accumulator's elements are spread over the warp: lane l owns the elements whose row-major index is l modulo
// 32. mma_sync computes, and store_matrix_sync writes, the calling lane's elements only, so no lane writes another's
// and a read of the stored tile before a __syncwarp() is a race, as on the GPU.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    for (int e = cuda_cpu::lane(); e < M * N; e += 32) {
        const int i = e / N, j = e % N;
        float total = c.value[e];
        for (int k = 0; k < K; ++k) {
            total += a.at(i, k) * b.at(k, j);  // half x half is exact in float
        }
        d.value[e] = total;
    }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
    detail::check_pointer(p, ldm, "store_matrix_sync");
    for (int e = cuda_cpu::lane(); e < M * N; e += 32) {
        const int r = e / N, c = e % N;
        p[layout == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r] = f.at(r, c);
    }
}

}  // namespace wmma
}  // namespace nvcuda

namespace cuda_cpu {

// The element type a kernel parameter takes, spelled as numpy names it ("float32*", "int32"): the launcher
// compares it with what Python passes, so a wrong scalar width or array dtype is an error, not garbage.
template <typename T>
struct TypeName;
template <> struct TypeName<float> { static constexpr const char* value = "float32"; };
template <> struct TypeName<int> { static constexpr const char* value = "int32"; };
template <> struct TypeName<long long> { static constexpr const char* value = "int64"; };
template <> struct TypeName<__half> { static constexpr const char* value = "float16"; };
template <> struct TypeName<unsigned short> { static constexpr const char* value = "uint16"; };

template <typename T>
inline std::string type_name() {
    if constexpr (std::is_pointer<T>::value) {
        return std::string(TypeName<std::remove_cv_t<std::remove_pointer_t<T>>>::value) + "*";
    } else {
        return TypeName<std::remove_cv_t<T>>::value;
    }
}

template <typename... A, size_t... I>
inline void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// Runs kernel(args) over the grid; returns 0, or 1 with the reason in err.
template <typename... A>
int launch(const char* name, void (*kernel)(A...), const LaunchConfig& cfg, void** args, const char** types,
           int n_args, char* err, int err_len) {
    auto refuse = [&](const std::string& why) {
        std::snprintf(err, err_len, "%s: %s", name, why.c_str());
        return 1;
    };
    const std::string expected[] = {type_name<A>()..., ""};
    if (n_args != (int)sizeof...(A)) {
        return refuse("takes " + std::to_string(sizeof...(A)) + " arguments, got " + std::to_string(n_args));
    }
    for (int i = 0; i < n_args; ++i) {
        if (expected[i] != types[i]) {
            return refuse("argument " + std::to_string(i) + " is " + expected[i] + ", got " + types[i]);
        }
    }
    const unsigned long long threads = (unsigned long long)cfg.block[0] * cfg.block[1] * cfg.block[2];
    if (threads == 0 || threads > 1024 || cfg.block[2] > 64) {
        return refuse("a block of " + std::to_string(threads) + " threads (1 to 1024, z at most 64)");
    }
    if (cfg.grid[0] == 0 || cfg.grid[1] == 0 || cfg.grid[2] == 0 || cfg.grid[1] > 65535 || cfg.grid[2] > 65535 ||
        cfg.grid[0] > 2147483647u) {
        return refuse("a grid of " + std::to_string(cfg.grid[0]) + "x" + std::to_string(cfg.grid[1]) + "x" +
                      std::to_string(cfg.grid[2]) + " blocks is not launchable");
    }
    if (cfg.shared_mem != 0) {
        return refuse("dynamic shared memory is not emulated (declare __shared__ arrays with a fixed size)");
    }
    const int n = (int)threads;
    std::mutex m;
    std::condition_variable start_cv, done_cv;
    long long serial = -1;  // which block the pool runs now
    int remaining = 0;
    bool quit = false;
    BlockRun* run = nullptr;
    dim3 block_index;
    auto worker = [&](int tid) {
        long long seen = -1;
        threadIdx.x = tid % cfg.block[0];
        threadIdx.y = (tid / cfg.block[0]) % cfg.block[1];
        threadIdx.z = tid / (cfg.block[0] * cfg.block[1]);
        blockDim = dim3{cfg.block[0], cfg.block[1], cfg.block[2]};
        gridDim = dim3{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
        current_thread = tid;
        for (;;) {
            BlockRun* here;
            {
                std::unique_lock<std::mutex> lock(m);
                start_cv.wait(lock, [&] { return quit || serial != seen; });
                if (quit) {
                    return;
                }
                seen = serial;
                here = run;
                blockIdx = block_index;
            }
            current_block = here;
            try {
                here->enter(tid);
                call(kernel, args, std::index_sequence_for<A...>{});
            } catch (const Unwind&) {
            } catch (const std::exception& e) {
                here->fail(std::string("exception: ") + e.what());
            }
            here->exit(tid);
            std::unique_lock<std::mutex> lock(m);
            if (--remaining == 0) {
                done_cv.notify_one();
            }
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(n);
    for (int t = 0; t < n; ++t) {
        pool.emplace_back(worker, t);
    }
    std::string failure;
    unsigned long long index = 0;
    for (unsigned z = 0; z < cfg.grid[2] && failure.empty(); ++z) {
        for (unsigned y = 0; y < cfg.grid[1] && failure.empty(); ++y) {
            for (unsigned x = 0; x < cfg.grid[0] && failure.empty(); ++x, ++index) {
                BlockRun block(n, cfg.order, cfg.seed * 1000003ull + index);
                {
                    std::unique_lock<std::mutex> lock(m);
                    run = &block;
                    block_index = dim3{x, y, z};
                    remaining = n;
                    serial += 1;
                }
                start_cv.notify_all();
                {
                    std::unique_lock<std::mutex> lock(m);
                    done_cv.wait(lock, [&] { return remaining == 0; });
                }
                if (block.failed) {
                    failure = block.message;
                }
            }
        }
    }
    {
        std::unique_lock<std::mutex> lock(m);
        quit = true;
    }
    start_cv.notify_all();
    for (auto& t : pool) {
        t.join();
    }
    if (!failure.empty()) {
        return refuse(failure);
    }
    return 0;
}

}  // namespace cuda_cpu

// One exported launcher per kernel; the harness writes one line of this per kernel name after the #include of the
// source.
#define CUDA_CPU_KERNEL(name)                                                                                    \
    extern "C" int cuda_cpu_launch_##name(const cuda_cpu::LaunchConfig* cfg, void** args, const char** types, \
                                          int n_args, char* err, int err_len) {                                \
        return cuda_cpu::launch(#name, name, *cfg, args, types, n_args, err, err_len);                         \
    }
