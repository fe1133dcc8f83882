/* crossent native CPU kernels: the fused softmax and sigmoid cross-entropy families, and the
 * per-row statistics of the calibration metrics.
 *
 * Built on first use by crossent/backends/native/__init__.py with the system C compiler
 * (cc -O3 -march=native -fopenmp -shared -fPIC) and loaded with ctypes; no Python or torch
 * headers, so the build takes seconds (10-20 of CPU time). The Python side passes raw pointers of
 * contiguous tensors and a struct of options; every formula here is the one of the torch path
 * (crossent/backends/torch_ops/softmax.py, crossent/backends/torch_ops/binary.py) and of crossent.reference, and the tests
 * run both paths against the reference.
 *
 * Why C: the loss is memory-bound, and the torch-op path needs several passes over each
 * block (ATen fuses no softmax with a row sum, nor sigmoid with log). Here each softmax row is
 * read from memory once (then twice more from L2) and its gradient written once; each binary
 * element is read once and its gradient written once.
 *
 * Vectorisation: the inner loops are plain scalar C over contiguous arrays, written without
 * branches (selects only), which gcc and clang vectorise at -O3. exp and log of the float path
 * are the Cephes polynomials as always-inline functions, so that they vectorise too (libm's expf
 * is a call, and a loop that calls it stays scalar): relative error below 1e-7 for exp_f over
 * [-87, 88] and for log_f and log_pos_f over the normal floats (absolute below 5e-8 on
 * [0.5, 2]), checked over dense grids by tests/test_dense.py through ce_exp_log_f32. Options
 * that change per element (a per-class focal factor, the asymmetric loss's two gammas) are
 * chosen per call, per row or per segment and instantiated as separate loops, never branched on
 * inside one. The double path (gradcheck, the float64 tests, float64 NumPy input to the calibration
 * metrics) has its own vectorisable exp, exp_d, and calls libm for the rest.
 * Four loops use intrinsics, all in the calibration statistics. Two are where a compare mask
 * picks the few entries that go to a classwise bin of their own: cw_row_simd and prob_row_simd,
 * written once over a small vector shim (vf, vd) defined for AVX-512 and for AVX2 + FMA. Two
 * are AVX-512 only: exp_row_simd, the exponentials of a row of logits, where exp_f's integer
 * steps become two instructions, and moment_row_simd, the moments of temperature scaling, in
 * four vector chains. The body's portable loops run elsewhere, and with -DCE_PORTABLE;
 * tests/calibration/test_rows.py builds each variant the CPU can run.
 *
 * Threads: rows (softmax) or element ranges (binary) are split across `n_threads` threads of
 * the OpenMP runtime that torch uses (pthreads when built without OpenMP); each thread owns its
 * scratch rows and its partial sums, so there is no sharing.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CE_API __attribute__((visibility("default")))

/* On CPUs with AVX-512, gcc's tuning vectorises loops at 256 bits. The calibration pass
 * (ce_calibration, mostly one exponential per entry) is faster with 512-bit vectors: 18 % from
 * logits on an Intel Xeon (BENCHMARKS.md), where the softmax kernels were not all faster (rows
 * of 80 classes 5-16 % slower), so only that pass asks for them (gcc 8 on; clang has no such
 * attribute). */
#if defined(__AVX512F__) && defined(__GNUC__) && __GNUC__ >= 8 && !defined(__clang__)
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

/* dtype codes, mirrored in _native.py */
enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3, DT_U8 = 4, DT_I64 = 5 };

/* Elements per segment of the binary kernel and per partial sum of the row reductions: small
 * enough for the per-thread staging buffers to sit in L1/L2, large enough for long vector
 * loops. Partial sums of SEG floats (8 lanes: 256 terms per lane) lose no more than ~1e-5
 * relative in the worst case before they are added in double. */
#define SEG 2048

static inline float f_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_from_f(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* exp(x) in float, vectorisable. x = n ln2 + r with |r| <= ln2/2 (ln2 split in a hi part with
 * 9 significant bits, exact in n*hi, and a lo part); exp(r) by the degree-6 Cephes polynomial;
 * 2^n built in the exponent bits in two halves so that results down to the subnormal range
 * (n >= -150) are right. NaN stays NaN; x > 88.72 overflows to inf; x < -110 gives 0. */
static inline __attribute__((always_inline)) float exp_f(float x) {
    x = x < -110.0f ? -110.0f : x;  /* comparisons are false for NaN: NaN passes through */
    x = x > 89.0f ? 89.0f : x;
    /* 1.5 * 2^23: adding it rounds x*log2(e) to an integer held in the low mantissa bits */
    const float magic = 12582912.0f;
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    int32_t ni = (int32_t)(bits_from_f(t) - bits_from_f(magic));
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t n1 = ni >> 1; /* floor(n / 2): both halves stay within the normal exponent range */
    int32_t n2 = ni - n1;
    y = y * f_from_bits((uint32_t)(n1 + 127) << 23);
    return y * f_from_bits((uint32_t)(n2 + 127) << 23);
}

static inline double d_from_bits(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
static inline uint64_t bits_from_d(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* exp(x) in double, vectorisable (libm's exp is a call, and a loop that calls it stays scalar).
 * x = n ln2 + r with |r| <= ln2/2: ln2 split as fdlibm's ln2_hi (21 trailing zero bits, so
 * n ln2_hi is exact for |n| < 2^21) and ln2_lo; exp(r) = 1 + r + r^2 P(r) with P the Taylor
 * polynomial 1/2! + r/3! + ... + r^11/13!, whose truncation error (|r|^14/14! < 4e-18) is below
 * the rounding of the result; 2^n built in the exponent bits in two halves, so that results
 * down to the subnormal range are right. About 1 ulp (tests/test_dense.py bounds it against
 * NumPy over dense grids). exp(0) = 1 exactly; NaN stays NaN; x > 709.79 overflows to inf;
 * x < -745.2 gives 0. */
static inline __attribute__((always_inline)) double exp_d(double x) {
    x = x < -746.0 ? -746.0 : x; /* comparisons are false for NaN: NaN passes through */
    x = x > 710.0 ? 710.0 : x;
    /* 1.5 * 2^52: adding it rounds x*log2(e) to an integer held in the low mantissa bits */
    const double magic = 6755399441055744.0;
    const double t = x * 1.4426950408889634 + magic;
    const double n = t - magic;
    const int64_t ni = (int64_t)(bits_from_d(t) - bits_from_d(magic));
    double r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.6059043836821613e-10; /* 1/13! */
    p = p * r + 2.08767569878681e-09;  /* 1/12! */
    p = p * r + 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 1.984126984126984e-04;
    p = p * r + 1.388888888888889e-03;
    p = p * r + 8.333333333333333e-03;
    p = p * r + 4.1666666666666664e-02;
    p = p * r + 1.6666666666666666e-01;
    p = p * r + 0.5;
    const double y = p * (r * r) + r + 1.0;
    const int64_t n1 = ni >> 1; /* floor(n / 2): both halves stay within the normal exponent range */
    const int64_t n2 = ni - n1;
    return y * d_from_bits((uint64_t)(n1 + 1023) << 52) * d_from_bits((uint64_t)(n2 + 1023) << 52);
}

/* Cephes logf's polynomial: log(2^e m) for m in [sqrt(1/2), sqrt(2)), as
 * f - f^2/2 + f^3 P(f) + e log 2 with f = m - 1 and log 2 split in two parts (the
 * 0.693359375 part is exact in float, so e * it adds no rounding for |e| < 2^15). */
static inline __attribute__((always_inline)) float log_reduced_f(float m, int32_t e) {
    float f = m - 1.0f;
    float fe = (float)e;
    float z = f * f;
    float y = 7.0376836292E-2f;
    y = y * f - 1.1514610310E-1f;
    y = y * f + 1.1676998740E-1f;
    y = y * f - 1.2420140846E-1f;
    y = y * f + 1.4249322787E-1f;
    y = y * f - 1.6668057665E-1f;
    y = y * f + 2.0000714765E-1f;
    y = y * f - 2.4999993993E-1f;
    y = y * f + 3.3333331174E-1f;
    y = y * f * z;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    return f + y + fe * 0.693359375f;
}

/* log of the float with bits u, times 2^e_offset: the exponent and mantissa m in [0.5, 1) read
 * from the bits, m moved to [sqrt(1/2), sqrt(2)), then log_reduced_f. */
static inline __attribute__((always_inline)) float log_bits_f(uint32_t u, int32_t e_offset) {
    int32_t e = (int32_t)((u >> 23) & 0xffu) - 126 + e_offset;
    float m = f_from_bits((u & 0x007fffffu) | 0x3f000000u); /* [0.5, 1) */
    int small = m < 0.707106781186547524f;
    e = small ? e - 1 : e;
    m = small ? m + m : m;
    return log_reduced_f(m, e);
}

/* log(x) in float, vectorisable (Cephes logf): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
 * log(m) = f - f^2/2 + f^3 P(f) with f = m - 1. Subnormals are scaled by 2^23 first;
 * log(0) = -inf, log(inf) = inf, log(x < 0) = NaN, NaN stays NaN. */
static inline __attribute__((always_inline)) float log_f(float x) {
    int sub = x < 1.17549435e-38f;
    float xs = sub ? x * 8388608.0f : x;
    float res = log_bits_f(bits_from_f(xs), sub ? -23 : 0);
    res = x == 0.0f ? -INFINITY : res;
    res = x < 0.0f ? NAN : res;
    res = x == INFINITY ? INFINITY : res;
    return x != x ? x : res;
}

/* log(x) in float for 0 <= x < inf, without log_f's special cases (a cheaper vector loop): the
 * same polynomial, so for normal x the same value; 0 and subnormal x give about -88 (the
 * exponent field read as that of 2^-127), not -inf and not the exact log: callers clamp the
 * result at -87 (the log of the smallest normal float, about -87.34), where any power
 * x^gamma with gamma >= 0.1 is below 2e-4 of its largest value. NaN in gives NaN out. */
static inline __attribute__((always_inline)) float log_pos_f(float x) {
    float res = log_bits_f(bits_from_f(x), 0);
    return x != x ? x : res;
}

/* tanh(x) in float for |x| < TANH_SMALL_MAX (Cephes tanhf's odd polynomial); a loop whose
 * arguments all lie there (the common case of a soft cap well above the logits) needs nothing
 * more: no exp, no division. */
#define TANH_SMALL_MAX 0.625f
static inline __attribute__((always_inline)) float tanh_small_f(float x) {
    float z = x * x;
    float p = -5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    return p * z * x + x;
}

/* tanh(x) in float (Cephes tanhf): tanh_small_f for |x| < 0.625, else
 * 1 - 2 / (exp(2|x|) + 1) with the sign of x (no cancellation there: |tanh| > 0.55). */
static inline __attribute__((always_inline)) float tanh_f(float x) {
    float ax = x < 0.0f ? -x : x;
    float small = tanh_small_f(x);
    float big = 1.0f - 2.0f / (exp_f(2.0f * ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < TANH_SMALL_MAX ? small : big;
}

static inline float bf16_to_f(uint16_t h) { return f_from_bits((uint32_t)h << 16); }

/* float -> bfloat16, rounding to nearest even (NaN kept quiet) */
static inline uint16_t f_to_bf16(float f) {
    uint32_t u = bits_from_f(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((f != f) ? nan : rounded);
}

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
typedef _Float16 f16_t;
#else
#define HAVE_F16 0
typedef uint16_t f16_t;
#endif

CE_API int ce_has_f16(void) { return HAVE_F16; }

/* The float exp and logs above, elementwise over n values (for the tests of their error bounds):
 * e[i] = exp_f(x[i]), l[i] = log_f(x[i]), lp[i] = log_pos_f(x[i]). */
CE_API int ce_exp_log_f32(const float *x, float *e, float *l, float *lp, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        e[i] = exp_f(x[i]);
        l[i] = log_f(x[i]);
        lp[i] = log_pos_f(x[i]);
    }
    return 0;
}

/* exp_d elementwise over n values (for the test of its error bound). */
CE_API int ce_exp_f64(const double *x, double *e, int64_t n) {
    for (int64_t i = 0; i < n; ++i) e[i] = exp_d(x[i]);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* threads */

typedef void (*work_fn)(void *ctx, int64_t begin, int64_t end, int tid);

#define MAX_THREADS 64

#ifdef _OPENMP
#include <omp.h>
/* Split [0, n) into contiguous ranges, one per thread of an OpenMP team. Built with -fopenmp,
 * this library needs "libgomp.so.1", which the dynamic loader resolves to the copy that torch
 * has already loaded: the kernels then run on torch's own thread pool. With a separate pool,
 * torch's OpenMP workers, which spin for a while after each parallel op, would compete with
 * ours for the cores (measured: 2x slower on 2 cores). */
static void parallel_for(int64_t n, int n_threads, work_fn fn, void *ctx) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n) n_threads = (int)n;
    if (n_threads <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
#pragma omp parallel num_threads(n_threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        fn(ctx, n * t / T, n * (t + 1) / T, t);
    }
}
#else
typedef struct {
    work_fn fn;
    void *ctx;
    int64_t begin, end;
    int tid;
} job_t;

static void *job_main(void *p) {
    job_t *j = (job_t *)p;
    j->fn(j->ctx, j->begin, j->end, j->tid);
    return NULL;
}

/* Split [0, n) into n_threads contiguous ranges, run them on pthreads (the caller's thread
 * takes the first), and join. A failed pthread_create runs its range inline. */
static void parallel_for(int64_t n, int n_threads, work_fn fn, void *ctx) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n) n_threads = (int)n;
    if (n_threads < 1) n_threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < n_threads; ++t) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].begin = n * t / n_threads;
        jobs[t].end = n * (t + 1) / n_threads;
        jobs[t].tid = t;
        started[t] = 0;
    }
    for (int t = 1; t < n_threads; ++t)
        started[t] = pthread_create(&th[t], NULL, job_main, &jobs[t]) == 0;
    job_main(&jobs[0]);
    for (int t = 1; t < n_threads; ++t) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            job_main(&jobs[t]);
    }
}
#endif

CE_API int ce_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline size_t dtype_size(int dt) {
    switch (dt) {
    case DT_F64: case DT_I64: return 8;
    case DT_BF16: case DT_F16: return 2;
    case DT_U8: return 1;
    default: return 4;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Arguments (mirrored as ctypes Structures in _native.py). */

typedef struct {
    int64_t n_rows, n_cols;
    int64_t x_row_stride, g_row_stride; /* in elements */
    const void *x;                      /* (N, C) logits, rows contiguous */
    void *grad;                         /* (N, C) gradient or NULL; may alias x */
    const int64_t *y;                   /* (N,) class indices, or NULL for probability targets */
    const void *t;                      /* (N, C) probability targets (accumulation dtype) or NULL */
    int64_t t_row_stride;
    const void *w;                      /* (C,) class weights (accumulation dtype) or NULL */
    const void *gamma_rows;             /* (N,) per-row gamma (accumulation dtype) or NULL */
    void *loss;                         /* (N,) per-row loss out (accumulation dtype) */
    void *ell;                          /* (N,) per-row -log q_y out (accumulation dtype) or NULL */
    int32_t x_dtype, g_dtype;
    int64_t ignore_index;
    double w_sum;                       /* sum of the class weights (C when w is NULL) */
    double eps, gamma, z_loss, softcap, conf, poly1;
    double scale;                       /* multiplies the gradient (sum, none: 1 or grad_output) */
    int32_t n_threads;
    int32_t mean;                       /* 1: the gradient scale is 1 / denominator, found here */
    double total;                       /* out: sum of the row losses (times the scale for a mean) */
    double denom;                       /* out: the mean's denominator (sum of w_y over kept rows) */
    int64_t spatial;                    /* > 1: x, grad are (N, C, S) and n_rows = N S (index targets) */
    void *stats;                        /* (N, 3) out (accumulation dtype) or NULL: per row lse, the
                                         * entropy H(q) and 1 where the first argmax of u is the target */
    int32_t has_step;                   /* 1: a step schedule, gamma = step_below where the row's
                                         * true-class probability p < step_threshold, else step_above */
    double step_threshold, step_below, step_above;
    int32_t t_negative;                 /* out: 1 where a probability target is below 0, else 0 */
} sm_args;

typedef struct {
    int64_t n;                          /* elements */
    const void *x;                      /* logits, contiguous */
    void *grad;                         /* gradient or NULL, contiguous */
    const void *t;                      /* targets, contiguous */
    const void *w;                      /* weight base (accumulation dtype) or NULL */
    const void *pw;                     /* pos_weight base (accumulation dtype) or NULL */
    int64_t w_inner, w_period;          /* weight of element i: w[(i / inner) % period] */
    int64_t pw_inner, pw_period;
    void *loss;                         /* per-element loss out (accumulation dtype) or NULL */
    int32_t x_dtype, g_dtype, t_dtype;
    int32_t has_ignore;
    double ignore_value;
    double eps, gamma_pos, gamma_neg, alpha, clip; /* alpha < 0: no class balance */
    double scale;                       /* multiplies the gradient (sum, none) */
    int32_t n_threads;
    int32_t mean;                       /* 1: the gradient scale is 1 / (unmasked count), found here */
    double total;                       /* out: sum of the losses (times the scale for a mean) */
    double denom;                       /* out: the mean's denominator */
} bce_args;

/* Calibration statistics of (N, C) logits or probabilities (crossent.calibration), per row:
 * the top-label confidence, the first argmax, the NLL and Brier score of the label, the row sum
 * (and for probabilities the row minimum) for the caller's validation, with a count of the rows
 * that fail it; optionally the sums over rows of the top-label width bins and of the scores, and
 * the classwise width-bin sums of every entry. Logits may be scaled by an inverse temperature s
 * (p = softmax(s x)), with the first two moments of x under p for temperature scaling's
 * Newton steps. */
typedef struct {
    int64_t n_rows, n_cols, x_row_stride;
    const void *x;                      /* (N, C), rows contiguous */
    int32_t x_dtype;
    int32_t from_logits;
    const int64_t *y;                   /* (N,) labels in [0, C) */
    int32_t n_threads;
    int32_t n_bins;                     /* M: the width bins of top and of cw_p, cw_y */
    double *conf;                       /* (N,) out: top-label confidence, 1 / s or max p */
    int64_t *pred;                      /* (N,) out: first argmax */
    double *nll;                        /* (N,) out or NULL: -log p_y */
    double *brier;                      /* (N,) out or NULL: sum_k (p_k - [y = k])^2 */
    double *rowsum;                     /* (N,) out: sum_k x_k (finite iff the row is) */
    double *rowmin;                     /* (N,) out (probabilities) or NULL: min_k x_k */
    double *cw_p, *cw_y;                /* (M C) out or NULL, zeroed by the caller: bin b of class k at b C + k */
    double scale;                       /* logits: the inverse temperature s > 0 (1 for the metrics) */
    double *dmean;                      /* (N,) out (logits) or NULL: E_p[x] - x_y */
    double *dvar;                       /* (N,) out (logits, with dmean) or NULL: Var_p[x] */
    double *top;                        /* (3 M + 2) out or NULL, zeroed by the caller: per width bin of the
                                           confidence the count, the sum of confidences and the number
                                           correct; then the sums of the NLL and of the Brier score */
    double range_lo, range_hi, sum_tol; /* probabilities: the bounds of an entry and of |sum - 1| */
    int64_t suspects;                   /* out: rows whose sum is not finite and, for probabilities,
                                           rows with min < range_lo, max > range_hi or |sum - 1| > sum_tol */
} cal_args;

/* The width bin of p for M bins ((b - 1)/M, b/M], 0 going to the first: the number of inner
 * edges below p, as np.searchsorted(edges[1:-1], p, side="left"), with `edges` the M + 1 values
 * b/M (correctly rounded, as NumPy's arange(M + 1) / M). p M rounded down is a guess at most one
 * off, corrected against the edges themselves. NaN gives 0. */
static inline int width_bin(double p, const double *edges, int M) {
    const double f = p * M;
    int b = f >= 1.0 ? (f < (double)M ? (int)f : M - 1) : 0;
    while (b > 0 && !(edges[b] < p)) --b;
    while (b < M - 1 && edges[b + 1] < p) ++b;
    return b;
}

/* The classwise pass of one row for float rows u (see ce_calibration in _kernels_body.h),
 * with intrinsics for AVX-512 or AVX2 + FMA (the portable loop of the body otherwise): every
 * entry adds p_k = u_k inv (in double) to the column total first[k] (its class's first bin);
 * each entry above thr (a compare mask, rarely nonzero) moves its p_k from there to its own bin
 * in cwp, where that is another. A step is two vectors (2 VW entries: 32 with AVX-512, 16 with
 * AVX2): one compare each, the conversions to double and their FMAs, and the few entries above
 * thr taken from the masks' set bits. prob_row_simd, for probabilities, also takes the row's
 * max, min, sum and sum of squares in the same read, and prefetches the row `ahead` (two rows
 * on: its rows' es-byte entries, es <= 4, so one 64-byte line or less per 16 entries) spread
 * over the pass (see `spread` in ce_calibration),
 * with or without the classwise sums in the same order, so that a row's statistics do not
 * depend on whether they are taken (the meter and the one-shot functions agree). Float partial
 * sums of SEG entries are added in double. */
#if ((defined(__AVX512F__) && defined(__AVX512DQ__)) || (defined(__AVX2__) && defined(__FMA__))) && \
    !defined(CE_PORTABLE)
#include <immintrin.h>
#define HAVE_CW_SIMD 1
static inline void cw_big_f32(const float *u, int64_t j, int64_t C, double inv, double *restrict first,
                              double *restrict cwp, const double *edges, int M) {
    const double p = (double)u[j] * inv;
    const int b = width_bin(p, edges, M);
    if (b) { /* bin-major, first = bin 0: see ce_calibration's sums */
        cwp[b * C + j] += p;
        first[j] -= p;
    }
}

/* the entries from k on of cw_row_simd, one at a time */
static inline void cw_tail(const float *u, int64_t k, int64_t C, float thr, double inv, double *restrict first,
                           double *restrict cwp, const double *edges, int M) {
    for (; k < C; ++k) {
        first[k] += (double)u[k] * inv;
        if (u[k] > thr) cw_big_f32(u, k, C, inv, first, cwp, edges, M);
    }
}

/* the entries from k on of prob_row_simd_, one at a time, into the max m, the min lo and the
 * sums of the vector part (sum, sq); then the row's outputs */
static inline __attribute__((always_inline)) void prob_tail(
    const float *u, int64_t k, int64_t C, float thr, double *restrict first, double *restrict cwp,
    const double *edges, int M, float m, float lo, double sum, double sq, float *m_out, float *lo_out,
    double *sum_out, double *sq_out, const int CW) {
    float ts = 0.0f, tq = 0.0f;
    for (; k < C; ++k) {
        const float v = u[k];
        m = v > m ? v : m;
        lo = v < lo ? v : lo;
        ts += v;
        tq += v * v;
        if (CW) {
            first[k] += (double)v;
            if (v > thr) cw_big_f32(u, k, C, 1.0, first, cwp, edges, M);
        }
    }
    *m_out = m;
    *lo_out = lo;
    *sum_out = sum + (double)ts;
    *sq_out = sq + (double)tq;
}
#else
#define HAVE_CW_SIMD 0
#endif

/* The vector shim of cw_row_simd and prob_row_simd_: a vf holds VW floats, a vd VW / 2 doubles;
 * VF(op) and VD(op) name the instruction set's intrinsic, HALF_LOAD loads VW / 2 floats. */
#if HAVE_CW_SIMD && defined(__AVX512F__) && defined(__AVX512DQ__)
#define VW 16
#define VF(op) _mm512_##op##_ps
#define VD(op) _mm512_##op##_pd
#define HALF_LOAD _mm256_loadu_ps
typedef __m512 vf;
typedef __m512d vd;
/* bit i set where a[i] > b[i] (false for NaN) */
static inline unsigned vf_gt(vf a, vf b) { return (unsigned)_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
static inline float vf_hmin(vf v) { return _mm512_reduce_min_ps(v); }
static inline float vf_hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif HAVE_CW_SIMD /* AVX2 + FMA */
#define VW 8
#define VF(op) _mm256_##op##_ps
#define VD(op) _mm256_##op##_pd
#define HALF_LOAD _mm_loadu_ps
typedef __m256 vf;
typedef __m256d vd;
static inline unsigned vf_gt(vf a, vf b) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
/* the horizontal reductions: the two 128-bit halves, then within one */
#define HREDUCE8(name, op)                                                                                   \
    static inline float name(vf v) {                                                                       \
        __m128 h = _mm_##op##_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                 \
        h = _mm_##op##_ps(h, _mm_movehl_ps(h, h));                                                           \
        return _mm_cvtss_f32(_mm_##op##_ss(h, _mm_movehdup_ps(h)));                                          \
    }
HREDUCE8(vf_hmax, max)
HREDUCE8(vf_hmin, min)
HREDUCE8(vf_hsum, add)
#undef HREDUCE8
#endif

#if HAVE_CW_SIMD && defined(__AVX512F__) && defined(__AVX512DQ__)
#define HAVE_EXP_SIMD 1
/* the lanes of the last n < 16 entries, or all 16 */
static inline __mmask16 lanes(int64_t n) { return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }

/* exp_f on 16 lanes with two AVX-512 instructions in place of its integer steps: n rounded by
 * vrndscaleps, and y 2^n by vscalefps, which rounds once and gives the subnormal range, 0 and
 * inf itself. The same reduction and polynomial as exp_f, so the same values in the normal
 * range (the subnormal ones rounded once instead of twice). The clamps keep r finite for
 * x = -inf or +inf (n infinite would make r = x - n ln2 NaN); their operand order lets NaN
 * through (vmaxps and vminps return the second operand where either is NaN). */
static inline __m512 exp_v16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* e[k] = exp(b (u[k] - m)) for k < n (e may be u: each vector is read before it is written),
 * with the float sums of e and e^2 in two chains each (one chain would wait on every add's
 * latency); the last n mod 16 entries by masked loads and stores. gcc's vectorisation of the
 * same loop over exp_f, with its integer steps, a scalar remainder and one chain, took 1.9x the
 * time on a Zen 4 core (BENCHMARKS.md). */
static void exp_row_simd(const float *u, float *e, int64_t n, float m, float b, float *s_out, float *q_out) {
    const __m512 vm = _mm512_set1_ps(m), vb = _mm512_set1_ps(b);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, q0 = s0, q1 = s0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        const __m512 x = exp_v16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(u + k), vm), vb));
        const __m512 y = exp_v16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(u + k + 16), vm), vb));
        _mm512_storeu_ps(e + k, x);
        _mm512_storeu_ps(e + k + 16, y);
        s0 = _mm512_add_ps(s0, x);
        s1 = _mm512_add_ps(s1, y);
        q0 = _mm512_fmadd_ps(x, x, q0);
        q1 = _mm512_fmadd_ps(y, y, q1);
    }
    for (; k < n; k += 16) { /* the lanes past n load 0, and are zeroed after the exponential */
        const __mmask16 mk = lanes(n - k);
        const __m512 x = _mm512_maskz_mov_ps(
            mk, exp_v16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, u + k), vm), vb)));
        _mm512_mask_storeu_ps(e + k, mk, x);
        s0 = _mm512_add_ps(s0, x);
        q0 = _mm512_fmadd_ps(x, x, q0);
    }
    *s_out = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    *q_out = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));
}

/* sum over k < n with e[k] > 0 of e[k] d or e[k] d^2 (SQ), d = (u[k] - m) - c: the moments of
 * the logits under p for temperature scaling (see `moments` in ce_calibration), in four chains
 * (gcc's loop keeps one, and waits on each add's latency). The mask keeps a masked class
 * (u = -inf, e = 0) out, where e d would be 0 * inf. */
static inline __attribute__((always_inline)) __m512 moment_step(const float *u, const float *e, __mmask16 mk,
                                                                 __m512 vm, __m512 vc, __m512 acc, const int SQ) {
    const __m512 ev = _mm512_maskz_loadu_ps(mk, e);
    mk = _mm512_mask_cmp_ps_mask(mk, ev, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, u), vm), vc);
    const __m512 t = _mm512_mul_ps(ev, d);
    return _mm512_mask_add_ps(acc, mk, acc, SQ ? _mm512_mul_ps(t, d) : t);
}

static inline __attribute__((always_inline)) float moment_row_simd_(const float *u, const float *e, int64_t n,
                                                                    float m, float c, const int SQ) {
    const __m512 vm = _mm512_set1_ps(m), vc = _mm512_set1_ps(c);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        a0 = moment_step(u + k, e + k, 0xFFFF, vm, vc, a0, SQ);
        a1 = moment_step(u + k + 16, e + k + 16, 0xFFFF, vm, vc, a1, SQ);
        a2 = moment_step(u + k + 32, e + k + 32, 0xFFFF, vm, vc, a2, SQ);
        a3 = moment_step(u + k + 48, e + k + 48, 0xFFFF, vm, vc, a3, SQ);
    }
    for (; k < n; k += 16)
        a0 = moment_step(u + k, e + k, lanes(n - k), vm, vc, a0, SQ);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static float moment_row_simd(const float *u, const float *e, int64_t n, float m, float c, int sq) {
    return sq ? moment_row_simd_(u, e, n, m, c, 1) : moment_row_simd_(u, e, n, m, c, 0);
}
#else
#define HAVE_EXP_SIMD 0
#endif

#if HAVE_CW_SIMD
/* first[k .. k + VW) += (double)u[k .. k + VW) * iv; the halves converted from memory, a load
 * each, not a shuffle on the conversion's port */
static inline __attribute__((always_inline)) void first_fma(const float *u, int64_t k, vd iv,
                                                            double *restrict first) {
    for (int h = 0; h < VW; h += VW / 2)
        VD(storeu)(first + k + h, VD(fmadd)(VD(cvtps)(HALF_LOAD(u + k + h)), iv, VD(loadu)(first + k + h)));
}

/* A step is two vectors, 2 VW entries. Its prefetches: a line of the row `ahead` per 16 entries
 * (es <= 4 bytes each; ahead is NULL at the end of the range). */
static inline __attribute__((always_inline)) void prefetch_step(const char *ahead, int64_t k, int64_t es) {
    if (ahead)
        for (int h = 0; h < 2 * VW; h += 16) __builtin_prefetch(ahead + (k + h) * es, 0, 2);
}

/* The classwise part of the step at k whose two vectors are v and w: their p = u inv (iv holds
 * inv) to the column totals, and the entries above the threshold tv to their own bins. */
static inline __attribute__((always_inline)) void cw_step(const float *u, int64_t k, int64_t C, vf v, vf w, vf tv,
                                                          vd iv, double inv, double *restrict first,
                                                          double *restrict cwp, const double *edges, int M) {
    first_fma(u, k, iv, first);
    first_fma(u, k + VW, iv, first);
    for (unsigned b = vf_gt(v, tv) | vf_gt(w, tv) << VW; b; b &= b - 1)
        cw_big_f32(u, k + __builtin_ctz(b), C, inv, first, cwp, edges, M);
}

static void cw_row_simd(const float *u, int64_t C, float thr, double inv, double *restrict first,
                        double *restrict cwp, const double *edges, int M) {
    const vf tv = VF(set1)(thr);
    const vd iv = VD(set1)(inv);
    int64_t k = 0;
    for (; k + 2 * VW <= C; k += 2 * VW)
        cw_step(u, k, C, VF(loadu)(u + k), VF(loadu)(u + k + VW), tv, iv, inv, first, cwp, edges, M);
    cw_tail(u, k, C, thr, inv, first, cwp, edges, M);
}

static inline __attribute__((always_inline)) void prob_row_simd_(
    const float *u, int64_t C, float thr, double *restrict first, double *restrict cwp, const double *edges,
    int M, const char *ahead, int64_t es, float *m_out, float *lo_out, double *sum_out, double *sq_out,
    const int CW) {
    vf vm = VF(set1)(-INFINITY), vl = VF(set1)(INFINITY);
    const vf tv = VF(set1)(thr);
    const vd one = VD(set1)(1.0);
    double sum = 0.0, sq = 0.0;
    int64_t k = 0;
    const int64_t full = C / (2 * VW) * (2 * VW);
    while (k < full) { /* two vectors a step, two chains per sum, one branch for both */
        const int64_t end = full - k < SEG ? full : k + SEG;
        vf s0 = VF(set1)(0.0f), s1 = s0, q0 = s0, q1 = s0;
        for (; k < end; k += 2 * VW) {
            prefetch_step(ahead, k, es);
            const vf v = VF(loadu)(u + k), w = VF(loadu)(u + k + VW);
            vm = VF(max)(vm, VF(max)(v, w));
            vl = VF(min)(vl, VF(min)(v, w));
            s0 = VF(add)(s0, v);
            s1 = VF(add)(s1, w);
            q0 = VF(fmadd)(v, v, q0);
            q1 = VF(fmadd)(w, w, q1);
            if (CW) cw_step(u, k, C, v, w, tv, one, 1.0, first, cwp, edges, M);
        }
        sum += (double)vf_hsum(VF(add)(s0, s1));
        sq += (double)vf_hsum(VF(add)(q0, q1));
    }
    prob_tail(u, k, C, thr, first, cwp, edges, M, vf_hmax(vm), vf_hmin(vl), sum, sq, m_out, lo_out, sum_out, sq_out,
              CW);
}

/* prob_row_simd_ with its CW constant: the pass with classwise sums where first is given */
static void prob_row_simd(const float *u, int64_t C, float thr, double *restrict first, double *restrict cwp,
                          const double *edges, int M, const char *ahead, int64_t es, float *m_out, float *lo_out,
                          double *sum_out, double *sq_out) {
    if (first)
        prob_row_simd_(u, C, thr, first, cwp, edges, M, ahead, es, m_out, lo_out, sum_out, sq_out, 1);
    else
        prob_row_simd_(u, C, thr, first, cwp, edges, M, ahead, es, m_out, lo_out, sum_out, sq_out, 0);
}
#endif

/* keep[k] = 1 where target i0 + k is not the ignore value, 0 where it is. The comparison is
 * torch's `target != ignore_index` with a Python number: in the target's own dtype, the value
 * rounded to it first (0.3 is 0.3f for fp32 targets, bf16(0.3) for bf16 ones, 0.3 for fp64);
 * integer and bool targets compare with the value itself. The mask of the loss and the count
 * of the "mean" both come from here, so they always agree. */
static void ignore_keep(unsigned char *restrict keep, const void *t, int32_t t_dtype, int64_t i0, int64_t n,
                        double value) {
    switch (t_dtype) {
    case DT_F64: {
        const double *s = (const double *)t + i0;
        for (int64_t k = 0; k < n; ++k) keep[k] = !(s[k] == value);
        break;
    }
    case DT_BF16: {
        const uint16_t *s = (const uint16_t *)t + i0;
        const float v = bf16_to_f(f_to_bf16((float)value));
        for (int64_t k = 0; k < n; ++k) keep[k] = !(bf16_to_f(s[k]) == v);
        break;
    }
#if HAVE_F16
    case DT_F16: {
        const f16_t *s = (const f16_t *)t + i0;
        const float v = (float)(f16_t)(float)value;
        for (int64_t k = 0; k < n; ++k) keep[k] = !((float)s[k] == v);
        break;
    }
#endif
    case DT_U8: {
        const uint8_t *s = (const uint8_t *)t + i0;
        for (int64_t k = 0; k < n; ++k) keep[k] = !((double)s[k] == value);
        break;
    }
    case DT_I64: {
        const int64_t *s = (const int64_t *)t + i0;
        for (int64_t k = 0; k < n; ++k) keep[k] = !((double)s[k] == value);
        break;
    }
    default: {
        const float *s = (const float *)t + i0;
        const float v = (float)value;
        for (int64_t k = 0; k < n; ++k) keep[k] = !(s[k] == v);
        break;
    }
    }
}

/* Number of targets != ignore_value (the denominator of a masked "mean"), by ignore_keep. */
typedef struct {
    const void *t;
    int32_t t_dtype;
    double value;
    int64_t *partial;
} count_args;

static void count_work(void *ctx, int64_t b, int64_t e, int tid) {
    const count_args *a = (const count_args *)ctx;
    unsigned char keep[SEG];
    int64_t c = 0;
    for (int64_t i = b; i < e; i += SEG) {
        const int64_t n = e - i < SEG ? e - i : SEG;
        ignore_keep(keep, a->t, a->t_dtype, i, n, a->value);
        for (int64_t k = 0; k < n; ++k) c += keep[k];
    }
    a->partial[tid] = c;
}

static int64_t ce_count_ne(const void *t, int32_t t_dtype, int64_t n, double value, int32_t n_threads) {
    int64_t partial[MAX_THREADS] = {0};
    count_args a = {t, t_dtype, value, partial};
    int threads = n < (1 << 16) ? 1 : n_threads;
    parallel_for(n, threads, count_work, &a);
    int64_t total = 0;
    for (int k = 0; k < MAX_THREADS; ++k) total += partial[k];
    return total;
}

/* ---------------------------------------------------------------------------------------- */
/* The kernels, once per accumulation type. */

#define ACC float
#define ACC_DT DT_F32
#define SFX _f32
#define EXP exp_f
#define LOG log_f
#define LOG_POS log_pos_f
#define SQRT sqrtf
#define TANH tanh_f
#define TANH_SMALL tanh_small_f
#include "_kernels_body.h"
#undef ACC
#undef ACC_DT
#undef SFX
#undef EXP
#undef LOG
#undef LOG_POS
#undef SQRT
#undef TANH
#undef TANH_SMALL

#define ACC double
#define ACC_DT DT_F64
#define SFX _f64
#define EXP exp_d
#define LOG log
#define LOG_POS log
#define SQRT sqrt
#define TANH tanh
#define TANH_SMALL tanh
#include "_kernels_body.h"

