// Products of a few input rows with a weight matrix, for decode steps (included by
// kernels.cu): out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in f32 and rounded
// once. A block of GEMV_THREADS threads computes GEMV_COLUMNS output columns for every input
// row: each thread streams 16-byte pieces of the columns' weight rows (GEMV_UNROLL pieces of
// each column in flight before any is used, with the streaming cache hint, since a decode step
// reads each weight once), and each piece of an input row, read once through the L1 cache,
// serves all the block's columns. Partial sums are added across the block's warps at the end.
// Instantiated for one and two rows (gemv1, gemv2); more rows make it bound by its f32
// multiply-adds (issue 23's run 5: slower than cuBLAS from three rows on), so f16 and bf16
// steps of up to eight rows run gemv_mma below instead, on the tensor cores.
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

// The same product on the tensor cores, for f16 and bf16 and up to eight input rows: a warp's
// mma.m16n8k16 multiplies 16 output columns' weights by 16 positions of the 8 (zero-padded)
// input rows, accumulating in f32. Each lane loads whole 16-byte pieces (8 positions) of its
// two columns' weight rows and of its input row and hands them to two mma's as they come:
// the sum runs over positions in an order of the mma's choosing, which is only a permutation
// of the positions, the same one for weights and inputs. A block's MMA_WARPS warps split the
// positions of its 16 columns between them and add their sums at the end.

#if __CUDA_ARCH__ >= 800

#define MMA_COLUMNS 16
#define MMA_WARPS 8
#define MMA_UNROLL 4

__device__ __forceinline__ void mma_16x8x16(float* c, const uint32_t* a, const uint32_t* b,
                                            const __nv_bfloat16*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_16x8x16(float* c, const uint32_t* a, const uint32_t* b,
                                            const __half*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ void gemv_mma(const T* __restrict__ x, const T* __restrict__ w, const T* bias,
                         T* out, int rows, int k, int n) {
    constexpr int U = MMA_UNROLL, STEP = 32 * MMA_UNROLL;
    __shared__ float partial[MMA_WARPS][MMA_COLUMNS][8];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int first = blockIdx.x * MMA_COLUMNS;
    // Lane (g, t) holds columns first + g and first + g + 8 and input row g.
    const T* low = w + (size_t)min(first + g, n - 1) * k;
    const T* high = w + (size_t)min(first + g + 8, n - 1) * k;
    const bool row_exists = g < rows;
    const T* input = x + (size_t)min(g, rows - 1) * k;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int base = warp * STEP + 8 * t; base < k; base += MMA_WARPS * STEP) {
        uint4 lo[U], hi[U], in[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int at = base + 32 * u;
            const bool inside = at < k;
            lo[u] = inside ? __ldcs(reinterpret_cast<const uint4*>(low + at)) : zero;
            hi[u] = inside ? __ldcs(reinterpret_cast<const uint4*>(high + at)) : zero;
            in[u] = inside && row_exists ? __ldg(reinterpret_cast<const uint4*>(input + at))
                                         : zero;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const uint32_t a0[4] = {lo[u].x, hi[u].x, lo[u].y, hi[u].y};
            const uint32_t b0[2] = {in[u].x, in[u].y};
            mma_16x8x16(c, a0, b0, x);
            const uint32_t a1[4] = {lo[u].z, hi[u].z, lo[u].w, hi[u].w};
            const uint32_t b1[2] = {in[u].z, in[u].w};
            mma_16x8x16(c, a1, b1, x);
        }
    }
    // c holds columns g and g + 8 for input rows 2t and 2t + 1.
    partial[warp][g][2 * t] = c[0];
    partial[warp][g][2 * t + 1] = c[1];
    partial[warp][g + 8][2 * t] = c[2];
    partial[warp][g + 8][2 * t + 1] = c[3];
    __syncthreads();
    if (threadIdx.x < MMA_COLUMNS * 8) {
        const int column = threadIdx.x / 8, row = threadIdx.x % 8, col = first + column;
        if (row < rows && col < n) {
            float sum = bias ? load(bias + col) : 0.f;
#pragma unroll
            for (int v = 0; v < MMA_WARPS; v++) sum += partial[v][column][row];
            store(out + (size_t)row * n + col, sum);
        }
    }
}

#define INSTANTIATE_GEMV_MMA(T, SUFFIX)                                                          \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                 \
        gemv_mma_##SUFFIX(const T* x, const T* w, const T* bias, T* out, int rows, int k,        \
                          int n) {                                                               \
        gemv_mma<T>(x, w, bias, out, rows, k, n);                                                \
    }

INSTANTIATE_GEMV_MMA(__half, f16)
INSTANTIATE_GEMV_MMA(__nv_bfloat16, bf16)

#endif  // __CUDA_ARCH__ >= 800
