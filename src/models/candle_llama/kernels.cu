// Fused kernels of the batched Llama-family decoder on CUDA (compiled to PTX by build.rs when
// the `cuda` feature is on). Each replaces a run of candle tensor ops of one decode step and
// computes in f32, rounding to the storage type once per stored value:
//
// - add_rms_norm: the residual add (x += delta * multiplier) and the next RMSNorm;
// - rope_kv_write: a fused q/k/v projection's output split into heads, q/k RMSNorm (Qwen3),
//   rotary embedding of q and k, and k and v written into their paged-cache slots;
// - paged_attention: one query per sequence over its own cache, read through its block table
//   (every sequence of a step in one launch, any length, grouped-query heads, sliding window);
// - silu_mul: silu(gate) * up of a fused gate/up projection;
// - gemv (gemv.cu): the projections of decode steps of up to eight rows;
// - sample_f32 (sample.cu): each row's greedy token or the host sampler's draw (f32 logits).
//
// Every decoder kernel exists for bf16, f16 and f32 storage (suffixes _bf16, _f16, _f32).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T> __device__ __forceinline__ float rounded(float v) {
    T t;
    store(&t, v);
    return load(&t);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// Values of a row each thread of add_rms_norm holds: a block of up to 1024 threads covers
// hidden sizes up to 16 384.
constexpr int NORM_PER_THREAD = 16;

// One block per row. x: [rows, hidden], updated in place when delta is given
// (x = x + delta * multiplier); out: [rows, hidden] = rmsnorm(x) * weight. Each thread keeps
// its values (i = thread, thread + blockDim, ...) in registers between the sum and the scaling,
// so that the row is read from memory once: every load of a thread is issued before any is used.
template <typename T>
__device__ void add_rms_norm(T* x, const T* delta, const T* weight, T* out, int hidden, float eps,
                             float multiplier) {
    __shared__ float partial[32];
    const int row = blockIdx.x;
    T* xr = x + (size_t)row * hidden;
    const T* dr = delta ? delta + (size_t)row * hidden : nullptr;
    float v[NORM_PER_THREAD], w[NORM_PER_THREAD];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        v[k] = 0.f;
        w[k] = 0.f;
        if (i < hidden) {
            v[k] = load(xr + i);
            w[k] = load(weight + i);
            if (dr) v[k] = rounded<T>(v[k] + rounded<T>(load(dr + i) * multiplier));
        }
    }
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < hidden) {
            if (dr) store(xr + i, v[k]);
            sum += v[k] * v[k];
        }
    }
    sum = warp_sum(sum);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = sum;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) / 32;
        float total = lane < warps ? partial[lane] : 0.f;
        total = warp_sum(total);
        if (lane == 0) partial[0] = total;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / hidden + eps);
    T* o = out + (size_t)row * hidden;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < hidden) store(o + i, v[k] * inv * w[k]);
    }
}

// Grid (tokens, heads + kv_heads), one warp per block. qkv: [tokens, (heads + 2 kv_heads) *
// dim], q then k then v. q_out: [tokens, heads * dim]. Caches: [kv_heads, slots, dim].
// cos/sin: [positions, dim / 2]. q_norm / k_norm: [dim] or null. dim <= 256, even.
template <typename T>
__device__ void rope_kv_write(const T* qkv, const uint32_t* positions, const uint32_t* slots,
                              const T* cos, const T* sin, const T* q_norm, const T* k_norm,
                              T* q_out, T* k_cache, T* v_cache, int heads, int kv_heads, int dim,
                              int total_slots, float eps) {
    const int token = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const int half_dim = dim / 2;
    const size_t width = (size_t)(heads + 2 * kv_heads) * dim;
    const T* row = qkv + token * width;
    const bool is_q = head < heads;
    const int kv_head = head - heads;
    const T* src = row + (size_t)head * dim;
    const T* norm = is_q ? q_norm : k_norm;
    // Each lane holds pairs (i, i + dim / 2) for i = lane, lane + 32, ...
    float a[4], b[4];
    float squares = 0.f;
    int pairs = 0;
    for (int i = lane; i < half_dim; i += 32, ++pairs) {
        a[pairs] = load(src + i);
        b[pairs] = load(src + i + half_dim);
        squares += a[pairs] * a[pairs] + b[pairs] * b[pairs];
    }
    if (norm) {
        const float inv = rsqrtf(warp_sum(squares) / dim + eps);
        pairs = 0;
        for (int i = lane; i < half_dim; i += 32, ++pairs) {
            a[pairs] = rounded<T>(a[pairs] * inv * load(norm + i));
            b[pairs] = rounded<T>(b[pairs] * inv * load(norm + i + half_dim));
        }
    }
    const uint32_t position = positions[token];
    T* dst = is_q ? q_out + ((size_t)token * heads + head) * dim
                  : k_cache + ((size_t)kv_head * total_slots + slots[token]) * dim;
    pairs = 0;
    for (int i = lane; i < half_dim; i += 32, ++pairs) {
        const float c = load(cos + (size_t)position * half_dim + i);
        const float s = load(sin + (size_t)position * half_dim + i);
        store(dst + i, a[pairs] * c - b[pairs] * s);
        store(dst + i + half_dim, a[pairs] * s + b[pairs] * c);
    }
    if (!is_q) {
        const T* v = row + (size_t)(heads + kv_heads + kv_head) * dim;
        T* vd = v_cache + ((size_t)kv_head * total_slots + slots[token]) * dim;
        for (int i = lane; i < dim; i += 32) vd[i] = v[i];
    }
}

// Grid (sequences, heads), WARPS warps per block. q: [rows, heads * dim], the query of
// sequence s in row rows[s] (rows null: row s). Caches: [kv_heads, slots, dim]. tables:
// [sequences, table_width] block ids; lens[s]: the sequence's positions, the query at the last.
// out: [sequences, heads * dim]. Online softmax per warp over positions w, w + WARPS, ...,
// merged at the end. dim <= 256.
constexpr int WARPS = 16;

template <typename T>
__device__ void paged_attention(const T* q, const uint32_t* rows, const T* k_cache,
                                const T* v_cache, const uint32_t* tables, const uint32_t* lens,
                                T* out, int heads, int kv_heads, int dim, int total_slots,
                                int block_size, int table_width, int window, float scale) {
    __shared__ float s_max[WARPS], s_sum[WARPS];
    __shared__ float s_acc[WARPS][256];
    const int seq = blockIdx.x, head = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kv_head = head / (heads / kv_heads);
    const int len = lens[seq];
    const int first = window > 0 && len > window ? len - window : 0;
    const size_t row = rows ? rows[seq] : seq;
    const T* qh = q + (row * heads + head) * dim;
    const uint32_t* table = tables + (size_t)seq * table_width;
    const T* keys = k_cache + (size_t)kv_head * total_slots * dim;
    const T* values = v_cache + (size_t)kv_head * total_slots * dim;
    float qv[8], acc[8];
    int parts = 0;
    for (int d = lane; d < dim; d += 32, ++parts) {
        qv[parts] = load(qh + d);
        acc[parts] = 0.f;
    }
    float running_max = -INFINITY, running_sum = 0.f;
    for (int p = first + warp; p < len; p += WARPS) {
        const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const T* k = keys + slot * dim;
        float dot = 0.f;
        int i = 0;
        for (int d = lane; d < dim; d += 32, ++i) dot += qv[i] * load(k + d);
        const float score = warp_sum(dot) * scale;
        const float new_max = fmaxf(running_max, score);
        const float correction = __expf(running_max - new_max);
        const float weight = __expf(score - new_max);
        running_sum = running_sum * correction + weight;
        const T* v = values + slot * dim;
        i = 0;
        for (int d = lane; d < dim; d += 32, ++i) acc[i] = acc[i] * correction + weight * load(v + d);
        running_max = new_max;
    }
    if (lane == 0) {
        s_max[warp] = running_max;
        s_sum[warp] = running_sum;
    }
    int i = 0;
    for (int d = lane; d < dim; d += 32, ++i) s_acc[warp][d] = acc[i];
    __syncthreads();
    float best = -INFINITY;
    for (int w = 0; w < WARPS; ++w) best = fmaxf(best, s_max[w]);
    float total = 0.f;
    for (int w = 0; w < WARPS; ++w)
        if (s_sum[w] > 0.f) total += s_sum[w] * __expf(s_max[w] - best);
    T* o = out + ((size_t)seq * heads + head) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float value = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (s_sum[w] > 0.f) value += s_acc[w][d] * __expf(s_max[w] - best);
        store(o + d, value / total);
    }
}

// out: [rows, ffn] = silu(gate) * up of gate_up: [rows, 2 * ffn].
template <typename T>
__device__ void silu_mul(const T* gate_up, T* out, int rows, int ffn) {
    const size_t n = (size_t)rows * ffn;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ffn, j = i % ffn;
        const float g = load(gate_up + r * 2 * ffn + j);
        const float u = load(gate_up + r * 2 * ffn + ffn + j);
        store(out + i, g / (1.f + __expf(-g)) * u);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void add_rms_norm_##SUFFIX(T* x, const T* delta, const T* weight,      \
                                                     T* out, int hidden, float eps,             \
                                                     float multiplier) {                        \
        add_rms_norm<T>(x, delta, weight, out, hidden, eps, multiplier);                         \
    }                                                                                            \
    extern "C" __global__ void rope_kv_write_##SUFFIX(                                           \
        const T* qkv, const uint32_t* positions, const uint32_t* slots, const T* cos,            \
        const T* sin, const T* q_norm, const T* k_norm, T* q_out, T* k_cache, T* v_cache,        \
        int heads, int kv_heads, int dim, int total_slots, float eps) {                          \
        rope_kv_write<T>(qkv, positions, slots, cos, sin, q_norm, k_norm, q_out, k_cache,        \
                         v_cache, heads, kv_heads, dim, total_slots, eps);                       \
    }                                                                                            \
    extern "C" __global__ void paged_attention_##SUFFIX(                                         \
        const T* q, const uint32_t* rows, const T* k_cache, const T* v_cache,                    \
        const uint32_t* tables, const uint32_t* lens, T* out, int heads, int kv_heads, int dim,  \
        int total_slots, int block_size, int table_width, int window, float scale) {             \
        paged_attention<T>(q, rows, k_cache, v_cache, tables, lens, out, heads, kv_heads, dim,   \
                           total_slots, block_size, table_width, window, scale);                 \
    }                                                                                            \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gate_up, T* out, int rows, int ffn) {  \
        silu_mul<T>(gate_up, out, rows, ffn);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

#include "gemv.cu"
#include "sample.cu"
