// Products of a few input rows with a weight matrix, for decode steps (included by
// kernels.cu): out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in f32 and rounded
// once. One warp per output column, eight columns a block; each lane streams 16-byte pieces of
// the column's weight row, so the weights are read once, at full width, for every input row.
// cuBLAS picks tiles of 64 or 128 columns by 8 rows for such products and a split-K pass,
// reading the weights at about half of the memory's bandwidth (docs/gpu-runs, issue 23).
// k times the element size must be a multiple of 16 bytes, and x and w 16-byte aligned.

#define GEMV_ROWS 8

template <typename T>
__device__ __forceinline__ void load16(T* dst, const T* src) {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
}

template <typename T>
__device__ void gemv(const T* x, const T* w, const T* bias, T* out, int rows, int k, int n) {
    constexpr int VEC = 16 / sizeof(T);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col = blockIdx.x * (blockDim.x / 32) + warp;
    if (col >= n) return;
    const T* wr = w + (size_t)col * k;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; m++) acc[m] = 0.f;
#pragma unroll 4
    for (int c = lane * VEC; c < k; c += 32 * VEC) {
        T wv[VEC];
        load16(wv, wr + c);
#pragma unroll
        for (int m = 0; m < GEMV_ROWS; m++) {
            if (m < rows) {
                T xv[VEC];
                load16(xv, x + (size_t)m * k + c);
                float s = 0.f;
#pragma unroll
                for (int j = 0; j < VEC; j++) s += load(&wv[j]) * load(&xv[j]);
                acc[m] += s;
            }
        }
    }
#pragma unroll
    for (int m = 0; m < GEMV_ROWS; m++) {
        if (m < rows) {
            const float v = warp_sum(acc[m]);
            if (lane == 0) store(out + (size_t)m * n + col, v + (bias ? load(bias + col) : 0.f));
        }
    }
}

#define INSTANTIATE_GEMV(T, SUFFIX)                                                              \
    extern "C" __global__ void gemv_##SUFFIX(const T* x, const T* w, const T* bias, T* out,      \
                                             int rows, int k, int n) {                           \
        gemv<T>(x, w, bias, out, rows, k, n);                                                    \
    }

INSTANTIATE_GEMV(float, f32)
INSTANTIATE_GEMV(__half, f16)
INSTANTIATE_GEMV(__nv_bfloat16, bf16)
