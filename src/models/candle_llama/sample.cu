// Token sampling on the device (included by kernels.cu): the host sampler's arithmetic
// (`src/models/sampling`, `src/models/cpu/exp.rs`) operation for operation, so that a row
// sampled here gives the token the host would give for the same logits and the same drawn
// fraction. Every float operation is written as its rounded intrinsic (`__fadd_rn`, ...):
// nvcc would otherwise fuse a product and a sum into one FMA, which the host never does.

#define SAMPLE_THREADS 256
// Values per block summed in f32 before the f64 total (the host's SUM_BLOCK).
#define SUM_BLOCK 1024
// The most blocks of a vocabulary (262 144 tokens): eight lanes and a tail each.
#define MAX_SUM_BLOCKS 256
// Words of a row's head in `spec`.
#define SPEC_HEAD 7
// The largest top-k drawn here (the host's MAX_DEVICE_TOP_K).
#define MAX_TOP_K 256

// The host's `exp_nonpositive`: e^x for x <= 0 as 2^n * (degree-6 Taylor polynomial of e^r).
__device__ __forceinline__ float exp_nonpositive(float x) {
    const float n = floorf(__fadd_rn(__fmul_rn(x, 0x1.715476p+0f), 0.5f));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, 0x1.63p-1f)), __fmul_rn(n, -0x1.bd0106p-13f));
    float poly = __fadd_rn(0x1.111112p-7f, __fmul_rn(r, 0x1.6c16c2p-10f));
    poly = __fadd_rn(0x1.555556p-5f, __fmul_rn(r, poly));
    poly = __fadd_rn(0x1.555556p-3f, __fmul_rn(r, poly));
    poly = __fadd_rn(0.5f, __fmul_rn(r, poly));
    poly = __fadd_rn(1.0f, __fmul_rn(r, poly));
    poly = __fadd_rn(1.0f, __fmul_rn(r, poly));
    const uint32_t biased = __float_as_uint(__fadd_rn(fmaxf(n, -126.0f), 8388735.0f));
    const float two_n = __uint_as_float(biased << 23);
    return x < -87.0f ? 0.0f : __fmul_rn(poly, two_n);
}

__device__ __forceinline__ float kept_weight(float w, float floor) { return w >= floor ? w : 0.0f; }

// The host's `sum_at_least` of one block: eight running lanes, summed in order, then the tail.
__device__ float block_mass(const float* lanes) {
    float sum = -0.0f;
    for (int j = 0; j < 8; j++) sum = __fadd_rn(sum, lanes[j]);
    return __fadd_rn(sum, lanes[8]);
}

// The host's `sum_at_least` of every block of `w` (`kept_weight` against `floor`): eight lanes
// and a tail per block into `s_lanes`. Called by every thread; synchronize before reading.
__device__ void lane_sums(const float* w, float floor, int vocab, float* s_lanes) {
    const int blocks = (vocab + SUM_BLOCK - 1) / SUM_BLOCK;
    for (int p = threadIdx.x; p < blocks * 9; p += SAMPLE_THREADS) {
        const int b = p / 9, j = p % 9;
        const int start = b * SUM_BLOCK;
        const int len = min(SUM_BLOCK, vocab - start);
        const int whole = len / 8 * 8;
        float sum;
        if (j < 8) {
            sum = 0.0f;
            for (int c = j; c < whole; c += 8) sum = __fadd_rn(sum, kept_weight(w[start + c], floor));
        } else {
            sum = -0.0f;
            for (int c = whole; c < len; c++) sum = __fadd_rn(sum, kept_weight(w[start + c], floor));
        }
        s_lanes[p] = sum;
    }
}

// The host's `kept_sum`: the blocks' sums added in f64, in order.
__device__ double lanes_total(const float* s_lanes, int blocks) {
    double total = 0.0;
    for (int b = 0; b < blocks; b++) total = __dadd_rn(total, (double)block_mass(s_lanes + 9 * b));
    return total;
}

// A float's place in `f32::total_cmp`'s order as an unsigned integer (-0.0 below +0.0).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The float whose `order_key` is `key` (a non-negative one here).
__device__ __forceinline__ float key_float(uint32_t key) { return __uint_as_float(key & 0x7fffffffu); }

// Top-p's floor over the whole vocabulary, as the host's `threshold` defines it: the largest
// weight whose kept mass (`lane_sums` at it as the floor) reaches `top_p` of the total. The
// mass only falls as the floor rises and changes only at a weight, so bisecting the floors
// between 0 and 1 (the most likely token's weight) by their order keys ends on that weight.
// Called by every thread; `s_lanes` is scratch.
__device__ float top_p_floor(const float* w, int vocab, float top_p, float* s_lanes) {
    __shared__ double s_goal;
    __shared__ int s_reaches;
    const int blocks = (vocab + SUM_BLOCK - 1) / SUM_BLOCK;
    lane_sums(w, 0.0f, vocab, s_lanes);
    __syncthreads();
    if (threadIdx.x == 0) s_goal = __dmul_rn((double)top_p, lanes_total(s_lanes, blocks));
    __syncthreads();
    const double goal = s_goal;
    uint32_t lo = order_key(0.0f), hi = order_key(1.0f);
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        lane_sums(w, key_float(mid), vocab, s_lanes);
        __syncthreads();
        if (threadIdx.x == 0) s_reaches = lanes_total(s_lanes, blocks) >= goal;
        __syncthreads();
        if (s_reaches) lo = mid;
        else hi = mid - 1;
        __syncthreads();
    }
    return key_float(lo);
}

// Whether a logit takes part in top-k (the host's: neither NaN nor -inf).
__device__ __forceinline__ bool ranked(float x) { return !isnan(x) && x != -INFINITY; }

// The host's draw under top-k (`Candidates::top_k`, then `nucleus` over the sorted list, then
// min-p, then `Kept::List::draw`), for a row whose largest logit `max` is finite. The k best
// logits (by `order_key`, then by id) are found by a radix select of the k-th key, a byte at a
// time, then taken (ties at the k-th key by lowest id: each thread walks its own range of ids
// and a scan ranks the ranges), sorted by counting, and walked by thread 0 in the host's
// arithmetic. Called by every thread of the block.
__device__ void draw_top_k(const float* l, uint32_t* out, int row, int vocab, float max,
                           float inverse, float min_p, uint32_t k, float top_p, double fraction) {
    __shared__ uint32_t s_hist[256];
    __shared__ uint32_t s_pick_id[MAX_TOP_K];
    __shared__ float s_pick_logit[MAX_TOP_K];
    __shared__ uint32_t s_id[MAX_TOP_K];
    __shared__ float s_weight[MAX_TOP_K];
    __shared__ uint32_t s_before[SAMPLE_THREADS];
    __shared__ uint32_t s_prefix, s_want, s_picked, s_all;
    const int tid = threadIdx.x;
    if (tid == 0) {
        s_want = k;
        s_all = 0;
        s_picked = 0;
    }
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += SAMPLE_THREADS) s_hist[b] = 0;
        __syncthreads();
        for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
            const float x = l[i];
            if (!ranked(x)) continue;
            const uint32_t key = order_key(x);
            if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t want = s_want;
            int digit = -1;
            for (int b = 255; b >= 0; b--) {
                if (s_hist[b] >= want) {
                    digit = b;
                    break;
                }
                want -= s_hist[b];
            }
            // No digit: fewer candidates than k in all (only the first byte can find that).
            if (digit < 0) s_all = 1;
            else {
                s_prefix = prefix | ((uint32_t)digit << shift);
                s_want = want;
            }
        }
        __syncthreads();
        if (s_all) break;
        prefix = s_prefix;
        mask |= 255u << shift;
    }
    const bool all = s_all;
    const uint32_t kth = prefix, equal_wanted = all ? 0 : s_want;
    const int span = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int lo = min(vocab, tid * span), hi = min(vocab, lo + span);
    uint32_t equal = 0;
    if (!all)
        for (int i = lo; i < hi; i++) equal += ranked(l[i]) && order_key(l[i]) == kth;
    s_before[tid] = equal;
    __syncthreads();
    if (tid == 0) {
        uint32_t run = 0;
        for (int t = 0; t < SAMPLE_THREADS; t++) {
            const uint32_t count = s_before[t];
            s_before[t] = run;
            run += count;
        }
    }
    __syncthreads();
    uint32_t rank = s_before[tid];
    for (int i = lo; i < hi; i++) {
        const float x = l[i];
        if (!ranked(x)) continue;
        const uint32_t key = order_key(x);
        bool take = all || key > kth;
        if (!take && key == kth) take = rank++ < equal_wanted;
        if (take) {
            const uint32_t at = atomicAdd(&s_picked, 1u);
            s_pick_id[at] = i;
            s_pick_logit[at] = x;
        }
    }
    __syncthreads();
    const int picked = s_picked;
    for (int p = tid; p < picked; p += SAMPLE_THREADS) {
        const uint32_t key = order_key(s_pick_logit[p]), id = s_pick_id[p];
        int place = 0;
        for (int q = 0; q < picked; q++) {
            const uint32_t other = order_key(s_pick_logit[q]);
            place += other > key || (other == key && s_pick_id[q] < id);
        }
        s_id[place] = id;
        s_weight[place] = s_pick_logit[p];
    }
    __syncthreads();
    if (tid != 0) return;
    double total = 0.0;
    for (int p = 0; p < picked; p++) {
        const float w = exp_nonpositive(__fmul_rn(__fsub_rn(s_weight[p], max), inverse));
        s_weight[p] = w;
        total = __dadd_rn(total, (double)w);
    }
    int kept = picked;
    if (top_p < 1.0f) {
        const double goal = __dmul_rn((double)top_p, total);
        double cumulative = 0.0;
        for (int p = 0; p < picked; p++) {
            cumulative = __dadd_rn(cumulative, (double)s_weight[p]);
            if (cumulative >= goal) {
                kept = p + 1;
                break;
            }
        }
    }
    if (min_p > 0.0f) {
        float most = 0.0f;
        for (int p = 0; p < kept; p++) most = fmaxf(most, s_weight[p]);
        const float floor = __fmul_rn(most, min_p);
        int n = 0;
        for (int p = 0; p < kept; p++) {
            if (s_weight[p] >= floor) {
                s_weight[n] = s_weight[p];
                s_id[n] = s_id[p];
                n++;
            }
        }
        kept = n;
    }
    double sum = 0.0;
    for (int p = 0; p < kept; p++) sum = __dadd_rn(sum, (double)s_weight[p]);
    double left = __dmul_rn(fraction, sum);
    out[2 * row + 1] = 1;
    for (int p = 0; p < kept; p++) {
        left = __dsub_rn(left, (double)s_weight[p]);
        if (left < 0.0) {
            out[2 * row] = s_id[p];
            return;
        }
    }
    out[2 * row] = kept > 0 ? s_id[kept - 1] : 0;
}

// One block per row. `logits`: [rows, vocab] f32, adjusted in place; `weights`: [rows, vocab]
// scratch. `spec`: per row SPEC_HEAD words (mode, first adjustment, adjustments,
// 1/temperature and min-p as f32 bits, top-k, top-p as f32 bits), then the adjustments, three
// words each (kind, token, f32 value): kind 0 adds the value (logit bias), 1 applies it as a
// repetition penalty, 2 subtracts it (presence and frequency penalties), in the host
// sampler's order. Modes: 0 greedy (the argmax of the adjusted logits), 1 a draw at
// `fractions[row]` of the kept weight (top-k and top-p off, min-p any), 2 nothing (a row the
// host samples), 3 a draw from the top k (then top-p, then min-p). `out`: per row the token and
// whether the fraction was used (the host's RNG advances only then).
extern "C" __global__ void sample_f32(float* logits, float* weights, const uint32_t* spec,
                                      const double* fractions, uint32_t* out, int vocab) {
    __shared__ float s_value[32];
    __shared__ int s_index[32];
    __shared__ float s_lanes[MAX_SUM_BLOCKS * 9];
    const int row = blockIdx.x;
    const uint32_t* head = spec + (size_t)row * SPEC_HEAD;
    const uint32_t mode = head[0];
    if (mode == 2) return;
    float* l = logits + (size_t)row * vocab;
    float* w = weights + (size_t)row * vocab;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) {
        const uint32_t* op = spec + head[1];
        for (uint32_t k = 0; k < head[2]; k++, op += 3) {
            if (op[1] >= (uint32_t)vocab) continue;
            const float v = __uint_as_float(op[2]);
            float x = l[op[1]];
            if (op[0] == 0) x = __fadd_rn(x, v);
            else if (op[0] == 1) x = x < 0.0f ? __fmul_rn(x, v) : __fdiv_rn(x, v);
            else x = __fsub_rn(x, v);
            l[op[1]] = x;
        }
    }
    __syncthreads();
    // The largest logit that is not NaN.
    float best = -INFINITY;
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) best = l[i] > best ? l[i] : best;
    for (int offset = 16; offset > 0; offset >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffff, best, offset));
    if (lane == 0) s_value[warp] = best;
    __syncthreads();
    float max = -INFINITY;
    for (int k = 0; k < SAMPLE_THREADS / 32; k++) max = fmaxf(max, s_value[k]);
    if (mode == 0 || !isfinite(max)) {
        // The first logit equal to the largest (0 when there is none: every logit NaN).
        int at = vocab;
        for (int i = tid; i < vocab && at == vocab; i += SAMPLE_THREADS)
            if (l[i] == max) at = i;
        for (int offset = 16; offset > 0; offset >>= 1) at = min(at, __shfl_xor_sync(0xffffffff, at, offset));
        if (lane == 0) s_index[warp] = at;
        __syncthreads();
        if (tid == 0) {
            int first = vocab;
            for (int k = 0; k < SAMPLE_THREADS / 32; k++) first = min(first, s_index[k]);
            out[2 * row] = first == vocab ? 0 : first;
            out[2 * row + 1] = 0;
        }
        return;
    }
    const float inverse = __uint_as_float(head[3]);
    float floor = __uint_as_float(head[4]);
    if (mode == 3) {
        draw_top_k(l, out, row, vocab, max, inverse, floor, head[5], __uint_as_float(head[6]),
                   fractions[row]);
        return;
    }
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) w[i] = exp_nonpositive(__fmul_rn(__fsub_rn(l[i], max), inverse));
    __syncthreads();
    const int blocks = (vocab + SUM_BLOCK - 1) / SUM_BLOCK;
    const float top_p = __uint_as_float(head[6]);
    // The most likely token weighs 1, so min-p's floor is min-p itself.
    if (top_p < 1.0f) floor = fmaxf(top_p_floor(w, vocab, top_p, s_lanes), floor);
    lane_sums(w, floor, vocab, s_lanes);
    __syncthreads();
    if (tid != 0) return;
    const double total = lanes_total(s_lanes, blocks);
    double left = __dmul_rn(fractions[row], total);
    out[2 * row + 1] = 1;
    for (int b = 0; b < blocks; b++) {
        const double mass = (double)block_mass(s_lanes + 9 * b);
        if (left >= mass) {
            left = __dsub_rn(left, mass);
            continue;
        }
        const int start = b * SUM_BLOCK, end = min(vocab, start + SUM_BLOCK);
        for (int i = start; i < end; i++) {
            const float x = w[i];
            if (x >= floor && x > 0.0f) {
                left = __dsub_rn(left, (double)x);
                if (left < 0.0) {
                    out[2 * row] = i;
                    return;
                }
            }
        }
    }
    // Rounding left a sliver past the last block: the last kept token.
    int last = 0;
    for (int i = vocab - 1; i >= 0; i--) {
        const float x = w[i];
        if (x >= floor && x > 0.0f) {
            last = i;
            break;
        }
    }
    out[2 * row] = last;
}
