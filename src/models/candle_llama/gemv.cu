// Products of one or two input rows with a weight matrix, for decode steps (included by
// kernels.cu): out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in f32 and rounded
// once. A block of GEMV_THREADS threads computes GEMV_COLUMNS output columns for every input
// row: each thread streams 16-byte pieces of the columns' weight rows (GEMV_UNROLL pieces of
// each column in flight before any is used, with the streaming cache hint, since a decode step
// reads each weight once), and each piece of an input row, read once through the L1 cache,
// serves all the block's columns. Partial sums are added across the block's warps at the end.
// Instantiated for one and two rows (gemv1, gemv2): with more, the f32 multiply-adds bind
// (issue 23's run 5: slower than cuBLAS from three rows on), and cuBLAS runs those steps.
// cuBLAS picks tiles of 64 or 128 columns by 8 rows for such products and a split-K pass,
// reading the weights at about half of the memory's bandwidth (docs/gpu-runs, issue 23).
// k times the element size must be a multiple of 16 bytes, and x and w 16-byte aligned.

#define GEMV_THREADS 128
#define GEMV_COLUMNS 4
#define GEMV_UNROLL 2

template <typename T, int VEC>
__device__ __forceinline__ void widen(const uint4& piece, float* out) {
    const T* values = reinterpret_cast<const T*>(&piece);
#pragma unroll
    for (int j = 0; j < VEC; j++) out[j] = load(&values[j]);
}

template <typename T, int R>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, const T* bias, T* out,
                     int rows, int k, int n) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int C = GEMV_COLUMNS, U = GEMV_UNROLL, STRIDE = GEMV_THREADS * VEC;
    __shared__ float partial[GEMV_THREADS / 32][R * C];
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const int first = blockIdx.x * C;
    const T* columns[C];
#pragma unroll
    for (int c = 0; c < C; c++) columns[c] = w + (size_t)min(first + c, n - 1) * k;
    float acc[R][C];
#pragma unroll
    for (int m = 0; m < R; m++)
#pragma unroll
        for (int c = 0; c < C; c++) acc[m][c] = 0.f;
    for (int base = t * VEC; base < k; base += U * STRIDE) {
        uint4 pieces[U][C];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int at = base + u * STRIDE;
#pragma unroll
            for (int c = 0; c < C; c++)
                pieces[u][c] = at < k ? __ldcs(reinterpret_cast<const uint4*>(columns[c] + at))
                                      : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int at = base + u * STRIDE;
            if (at >= k) break;
            float weights[C][VEC];
#pragma unroll
            for (int c = 0; c < C; c++) widen<T, VEC>(pieces[u][c], weights[c]);
#pragma unroll
            for (int m = 0; m < R; m++) {
                if (m < rows) {
                    float input[VEC];
                    widen<T, VEC>(__ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k + at)),
                                  input);
#pragma unroll
                    for (int c = 0; c < C; c++)
#pragma unroll
                        for (int j = 0; j < VEC; j++)
                            acc[m][c] = fmaf(weights[c][j], input[j], acc[m][c]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < R; m++)
#pragma unroll
        for (int c = 0; c < C; c++) {
            const float v = warp_sum(acc[m][c]);
            if (lane == 0) partial[warp][m * C + c] = v;
        }
    __syncthreads();
    if (t < R * C) {
        const int m = t / C, col = first + t % C;
        if (m < rows && col < n) {
            float sum = bias ? load(bias + col) : 0.f;
#pragma unroll
            for (int v = 0; v < GEMV_THREADS / 32; v++) sum += partial[v][t];
            store(out + (size_t)m * n + col, sum);
        }
    }
}

#define INSTANTIATE_GEMV(T, SUFFIX, R)                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                   \
        gemv##R##_##SUFFIX(const T* x, const T* w, const T* bias, T* out, int rows, int k,       \
                           int n) {                                                              \
        gemv<T, R>(x, w, bias, out, rows, k, n);                                                 \
    }

#define INSTANTIATE_GEMVS(T, SUFFIX)                                                             \
    INSTANTIATE_GEMV(T, SUFFIX, 1)                                                               \
    INSTANTIATE_GEMV(T, SUFFIX, 2)

INSTANTIATE_GEMVS(float, f32)
INSTANTIATE_GEMVS(__half, f16)
INSTANTIATE_GEMVS(__nv_bfloat16, bf16)

