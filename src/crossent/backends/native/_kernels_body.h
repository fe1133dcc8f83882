/* The kernels of _kernels.c, written once for an accumulation type ACC (float or double).
 * Included by _kernels.c with ACC, ACC_DT, SFX, EXP, LOG, LOG_POS, SQRT, TANH and TANH_SMALL
 * defined. */

#ifndef CE_CAT
#define CE_CAT_(a, b) a##b
#define CE_CAT(a, b) CE_CAT_(a, b)
#endif
#define FN(name) CE_CAT(name, SFX)
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* smallest normal number of ACC: keeps 0 / 0 out of a ratio whose numerator vanishes with it */
/* Float sums and maxima vectorise only if the compiler may reorder them: "omp simd" allows it
 * for these loops alone (-fopenmp-simd; no OpenMP runtime). Partial sums are per SEG terms. */
#ifndef SIMD_SUM
#define CE_PRAGMA(x) _Pragma(#x)
#define SIMD_SUM(...) CE_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define SIMD_MAX(v) CE_PRAGMA(omp simd reduction(max : v))
#define SIMD_MAX_SUM(v, p) CE_PRAGMA(omp simd reduction(max : v) reduction(+ : p))
#endif

#define TINY ((ACC)(sizeof(ACC) == 4 ? 1.17549435e-38 : 2.2250738585072014e-308))
/* about the log of TINY: the floor of a clamped log, whose exp is still finite and whose
 * product with a gamma in [0, 1) is at most its negation */
#define LOG_MIN ((ACC)(sizeof(ACC) == 4 ? -87.0 : -708.0))

/* src[i0 : i0 + n] (dtype dt) -> dst, converted to ACC */
static void FN(load)(ACC *restrict dst, const void *src, int dt, int64_t i0, int64_t n) {
    switch (dt) {
    case DT_F32: { const float *s = (const float *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)s[k]; break; }
    case DT_F64: { const double *s = (const double *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)s[k]; break; }
    case DT_BF16: { const uint16_t *s = (const uint16_t *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)bf16_to_f(s[k]); break; }
#if HAVE_F16
    case DT_F16: { const f16_t *s = (const f16_t *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)(float)s[k]; break; }
#endif
    case DT_U8: { const uint8_t *s = (const uint8_t *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)s[k]; break; }
    case DT_I64: { const int64_t *s = (const int64_t *)src + i0; for (int64_t k = 0; k < n; ++k) dst[k] = (ACC)s[k]; break; }
    default: break;
    }
}

/* src (ACC) -> dst[i0 : i0 + n] in dtype dt, rounded once (to nearest even) */
static void FN(store)(void *dst, int dt, int64_t i0, const ACC *restrict src, int64_t n) {
    switch (dt) {
    case DT_F32: { float *d = (float *)dst + i0; for (int64_t k = 0; k < n; ++k) d[k] = (float)src[k]; break; }
    case DT_F64: { double *d = (double *)dst + i0; for (int64_t k = 0; k < n; ++k) d[k] = (double)src[k]; break; }
    case DT_BF16: { uint16_t *d = (uint16_t *)dst + i0; for (int64_t k = 0; k < n; ++k) d[k] = f_to_bf16((float)src[k]); break; }
#if HAVE_F16
    case DT_F16: { f16_t *d = (f16_t *)dst + i0; for (int64_t k = 0; k < n; ++k) d[k] = (f16_t)(float)src[k]; break; }
#endif
    default: break;
    }
}

/* dst[k] = src[k] * A + B for a half-precision dst, converted in the same loop */
static void FN(store_affine)(void *dst, int dt, const ACC *restrict src, ACC A, ACC B, int64_t n) {
    if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t k = 0; k < n; ++k) d[k] = f_to_bf16((float)(src[k] * A + B));
#if HAVE_F16
    } else if (dt == DT_F16) {
        f16_t *d = (f16_t *)dst;
        for (int64_t k = 0; k < n; ++k) d[k] = (f16_t)(float)(src[k] * A + B);
#endif
    }
}

/* a half-precision row converted into dst, and its max, in one read */
static ACC FN(load_max)(ACC *restrict dst, const void *src, int dt, int64_t n) {
    ACC m = -INFINITY;
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        SIMD_MAX(m)
        for (int64_t k = 0; k < n; ++k) {
            const ACC v = (ACC)bf16_to_f(s[k]);
            dst[k] = v;
            m = v > m ? v : m;
        }
#if HAVE_F16
    } else if (dt == DT_F16) {
        const f16_t *s = (const f16_t *)src;
        SIMD_MAX(m)
        for (int64_t k = 0; k < n; ++k) {
            const ACC v = (ACC)(float)s[k];
            dst[k] = v;
            m = v > m ? v : m;
        }
#endif
    } else {
        FN(load)(dst, src, dt, 0, n);
        SIMD_MAX(m)
        for (int64_t k = 0; k < n; ++k) m = dst[k] > m ? dst[k] : m;
    }
    return m;
}

/* ---------------------------------------------------------------------------------------- */
/* Softmax family: one row at a time.
 *
 * Per row (u = the logits, soft-capped u = c tanh(x / c) when softcap is set):
 *   pass 1 (the one read of the logits from memory): m = max u (and sum_k w_k u_k for
 *          smoothing);
 *   (statistics only: the first argmax of u, from L1 right after the max)
 *   pass 2 (u from L2): e = exp(u - m), kept in the gradient row where it can be, S = sum e, so
 *          lse = m + log S (and sum e u for the entropy); for probability targets, in the one
 *          read of the target row from memory, sum a_k, sum a_k u_k and the check t >= 0; a
 *          step schedule picks the row's gamma here, from q_y;
 *   dense pass (focal with smoothing or with probability targets only; see dense_focal): the
 *          focal factor of every class, D = a g and the row sums of a f ell and of D;
 *   per-row scalars in double: the loss and the coefficients of
 *          G = q (rowc + cpc u - pc t~) + rowconst + ow w + Dc D - a - sparse onehot_y
 *   pass 3 (from L2): G written once, then the target entry replaced by its exact value.
 * The formulas are those of crossent/backends/torch_ops/softmax.py (see its docstring and
 * crossent.cross_entropy); focal rows take gamma from `gamma`, `gamma_rows` or the step schedule
 * (`has_step`). With `stats`, each row's [lse, H(q), argmax hit] is written too
 * (crossent._formula.row_statistics). */

typedef struct {
    const sm_args *a;
    ACC *scratch;     /* per thread: (u, g, e, D rows), then the tiles of sm_work_spatial */
    int64_t per_thread;
    double scale;     /* the gradient's multiplier */
    int64_t tile;     /* positions per tile of (N, C, S) logits */
    double partial[MAX_THREADS]; /* per-thread sums of the row losses */
    int t_negative[MAX_THREADS]; /* per thread: 1 where a probability target was below 0 */
} FN(sm_ctx);

/* The per-row coefficients of the formulation for class-index targets, from the row's
 * statistics: the C form of crossent/_formula.py (target_terms and regulariser_terms), written
 * once and instantiated for the two precisions that call it: double in sm_row (libm's pow) and
 * ACC in sm_work_columns (vectorised across positions, exp/log polynomials).
 *
 * Inputs: s the sample weight (w_y, 0 when ignored), valid (1, or 0 when ignored), lse,
 * ell = lse - u_y = -log q_y, omq = 1 - q_y and qy = q_y (each computed without cancellation by
 * the caller), uf = sum_k w_k f_k ell_k and ug = sum_k w_k g_k the uniform part's row sums
 * (f_k = (1 - q_k)^gamma, g_k = -f_k kappa_k; for gamma = 0 lse sum(w) - sum_k w_k u_k and
 * -sum(w)), gam the focusing parameter, keep = 1 - eps, uni = eps / C, wsum = sum_k w_k, zl the
 * z-loss weight, p1 the Poly-1 weight; has_w whether class weights are given; dense whether
 * the caller adds the uniform part's per-class term (eps/C) w_k g_k itself (focal with
 * smoothing; else it is the closed form -(eps/C) w here). Outputs: the row's loss and the
 * coefficients of
 *   G = q rowc + rowconst + ow w - sparse onehot_y [+ (eps/C) w g]   (times the reduction's scale)
 * - target part a_y (1-q_y)^gamma ell_y, a_y = (1-eps) s; its gradient is a_y f kappa (q -
 *   onehot_y) with f = (1-q_y)^gamma and kappa = 1 + gamma q_y ell / (1 - q_y): the finite
 *   ratio ell / (1 - q_y) -> 1 replaces (1-q)^(gamma-1), which overflows for gamma < 1;
 * - smoothing's uniform part (eps/C) sum_k w_k f_k ell_k, gradient (eps/C)(w g - q sum_k w_k g_k)
 *   (for gamma = 0: (eps/C)(lse sum(w) - sum w u) and (eps/C)(q sum(w) - w)); the target entry
 *   of its dense term, -(eps/C) w_y f_y kappa_y, joins `sparse`, which the caller writes exactly;
 * - z-loss (PaLM) s lambda lse^2, gradient 2 s lambda lse q;
 * - Poly-1 (Leng et al. 2022) s eps1 (1 - P), P = (1-eps) q_y + eps/C. */
#define CE_INDEX_COEFFICIENTS(NAME, T, POW)                                                       \
    ALWAYS_INLINE void NAME(T s, T valid, T lse, T ell, T omq, T qy, T uf, T ug, T gam, T keep,   \
                            T uni, T wsum, T zl, T p1, int has_w, int dense, T *loss, T *rowc,    \
                            T *sparse, T *rowconst, T *ow) {                                      \
        const T a_y = s * keep;                                                                   \
        T l, fk; /* fk = f_y kappa_y */                                                           \
        if (gam != 0) {                                                                           \
            const T factor = POW(omq, gam); /* omq = 0: 0 (1 for gamma = 0, never reached) */     \
            const T ratio = omq > 0 ? ell / omq : (T)1;                                           \
            l = a_y * factor * ell;                                                               \
            fk = factor * ((T)1 + gam * qy * ratio);                                              \
        } else {                                                                                  \
            l = a_y * ell;                                                                        \
            fk = 1;                                                                               \
        }                                                                                         \
        T c = a_y * fk;                                                                           \
        T sp = c, rc = 0, o = 0;                                                                  \
        if (uni != 0) {                                                                           \
            const T ue = uni * valid;                                                             \
            l += ue * uf;                                                                         \
            c -= ue * ug;                                                                         \
            if (dense) sp += ue * s * fk;                                                         \
            else if (has_w) o = -ue;                                                              \
            else rc = -ue;                                                                        \
        }                                                                                         \
        if (zl != 0) {                                                                            \
            l += s * zl * lse * lse;                                                              \
            c += s * (T)2 * zl * lse;                                                             \
        }                                                                                         \
        if (p1 != 0) {                                                                            \
            const T P = qy * keep + uni;                                                          \
            l += s * p1 * ((T)1 - P);                                                             \
            c += s * p1 * (P - uni);                                                              \
            sp += s * p1 * keep * qy;                                                             \
        }                                                                                         \
        *loss = l; *rowc = c; *sparse = sp; *rowconst = rc; *ow = o;                              \
    }

/* b^e in double for the per-row coefficients: for e a multiple of 1/2 in 1..5 (see
 * focal_halves) by multiplication and a square root, a few ulps from pow and much cheaper
 * (rows of 100 classes spend as long in pow as in their exponentials); else pow */
static inline double FN(pow_row)(double b, double e) {
    const double h = 2.0 * e;
    if (!(h >= 2.0 && h <= 10.0 && h == (double)(int)h)) return pow(b, e);
    const int n = (int)h;
    double r = (n & 1) ? sqrt(b) : 1.0;
    for (int i = 0; i < n / 2; ++i) r *= b;
    return r;
}
#define CE_POW_D(b, e) FN(pow_row)(b, e)
#define CE_POW_A(b, e) EXP((e) * LOG(b)) /* b = 0: log -inf, exp 0 */
CE_INDEX_COEFFICIENTS(FN(coef_d), double, CE_POW_D)
CE_INDEX_COEFFICIENTS(FN(coef_a), ACC, CE_POW_A)
#undef CE_POW_D
#undef CE_POW_A

/* max of a row and sum_k w_k u_k (w NULL: sum_k u_k) in one read; float partial sums of SEG
 * terms added in double */
static inline ACC FN(row_max_sum)(const ACC *restrict u, const ACC *restrict w, int64_t C, double *sum) {
    ACC m = -INFINITY;
    double total = 0.0;
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
        ACC part = 0;
        if (w) {
            SIMD_MAX_SUM(m, part)
            for (int64_t k = k0; k < k1; ++k) {
                m = u[k] > m ? u[k] : m;
                part += w[k] * u[k];
            }
        } else {
            SIMD_MAX_SUM(m, part)
            for (int64_t k = k0; k < k1; ++k) {
                m = u[k] > m ? u[k] : m;
                part += u[k];
            }
        }
        total += (double)part;
    }
    *sum = total;
    return m;
}

/* max of a row (a NaN may be skipped here, but reaches the loss through exp(NaN - m) anyway) */
static inline ACC FN(row_max)(const ACC *restrict u, int64_t C) {
    ACC m = -INFINITY;
    SIMD_MAX(m)
    for (int64_t k = 0; k < C; ++k) m = u[k] > m ? u[k] : m;
    return m;
}

/* The first k with v[k] == x, or -1: blocks of 64 compared at once (a vectorised OR), then the
 * block that holds it scanned one by one; for the statistics' argmax, right after the max pass
 * found x among the row's values (the row is still in cache). */
static inline int64_t FN(first_equal)(const ACC *restrict v, int64_t n, ACC x) {
    int64_t k0 = 0;
    for (; k0 + 64 <= n; k0 += 64) {
        int any = 0;
        CE_PRAGMA(omp simd reduction(| : any))
        for (int64_t k = k0; k < k0 + 64; ++k) any |= v[k] == x;
        if (any) break;
    }
    for (int64_t k = k0; k < n; ++k)
        if (v[k] == x) return k;
    return -1;
}

/* The dense target part, for a focal term that needs every class (probability targets, or the
 * uniform part of label smoothing): with a_k = w_k (t_k keep + uni) for probability targets
 * (`tr`), a_k = w_k for the uniform part of class indices (tr NULL; the caller scales it by
 * eps / C), writes D_k = a_k g_k to `d` and returns sum_k a_k f_k ell_k in *lf and sum_k D_k in
 * *lg, where f_k = (1 - q_k)^gamma and g_k = -f_k kappa_k, kappa = 1 + gamma q ell / (1 - q)
 * (see CE_INDEX_COEFFICIENTS). e = exp(u - m) (pass 2), q = e / S, ell = lse - u, and 1 - q
 * as such: it loses its relative precision as q -> 1 (the torch-op path's -expm1(-ell) keeps
 * it), but only at the row's max, where each use of it vanishes with it: the loss term
 * f ell ~ (1 - q)^(gamma + 1), and in the gradient a_j g_j - q_j sum_k a_k g_k the entry's own
 * a_j g_j comes with the factor 1 - q_j. An absolute error of ~1e-7 in 1 - q moves neither by
 * more than that (test_dense.py checks a saturated max against the reference). Float partial
 * sums of SEG terms, added in double.
 *
 * The power, chosen once per row (HALVES = 2 gamma, see focal_halves): for a gamma in 1..5 that
 * is a multiple of 1/2, (1 - q)^(gamma - 1) = (1 - q)^n sqrt(1 - q)^h with n = floor(gamma - 1)
 * and h = 2 (gamma - 1) - 2n in {0, 1}: repeated multiplication and, for a half-integer gamma
 * (focal 1.5, 2.5, ...), one square root (a vector instruction, correctly rounded, about a
 * quarter of the cost of a log and an exp); f kappa = f + gamma q ell (1 - q)^(gamma - 1) then
 * needs no division. For any other gamma (HALVES = 0) by one log and one exp, (1 - q)^(gamma - 1)
 * = exp((gamma - 1) log(1 - q)) with the log clamped at LOG_MIN (about the log of the smallest
 * normal number), so that it stays finite for gamma < 1 as q -> 1, where it multiplies 1 - q and
 * ell, both -> 0. HALVES, HAS_T and HAS_W are compile-time constants: one loop each, with no
 * branch inside, which the compiler vectorises. */
ALWAYS_INLINE void FN(dense_focal_seg)(const ACC *restrict u, const ACC *restrict e, const ACC *restrict tr,
                                       const ACC *restrict w, int64_t k0, int64_t k1, ACC keep, ACC uni,
                                       ACC lse, ACC inv_s, ACC gam, ACC *restrict d,
                                       ACC *pf_out, ACC *pg_out, const int HALVES, const int HAS_T,
                                       const int HAS_W) {
    ACC pf = 0, pg = 0;
    SIMD_SUM(pf, pg)
    for (int64_t k = k0; k < k1; ++k) {
        const ACC ek = e[k], q = ek * inv_s, ell = lse - u[k];
        const ACC omq = (ACC)1 - q;
        /* q ell -> 0 as q -> 0: a masked class (u = -inf, ell = inf) gives 0, not 0 * inf */
        const ACC qell = q > 0 ? q * ell : (ACC)0;
        ACC f, fk;
        if (HALVES > 0) {
            /* (1 - q)^(gamma - 1) = (1 - q)^n sqrt(1 - q)^h, n = (HALVES - 2) / 2, h = HALVES odd;
             * the conditions folded at compile time */
            const int n = (HALVES - 2) / 2;
            const ACC o2 = omq * omq, o4 = o2 * o2;
            const ACC pm1 = ((n & 1) ? omq : (ACC)1) * ((n & 2) ? o2 : (ACC)1) * ((n & 4) ? o4 : (ACC)1)
                            * ((HALVES & 1) ? SQRT(omq) : (ACC)1);
            f = pm1 * omq;
            fk = f + gam * qell * pm1;
        } else {
            ACC lo = LOG_POS(omq);
            lo = lo > LOG_MIN ? lo : LOG_MIN;
            const ACC pm1 = EXP((gam - (ACC)1) * lo);
            f = pm1 * omq;
            fk = f + gam * qell * pm1;
        }
        const ACC ak = (HAS_T ? tr[k] * keep + uni : (ACC)1) * (HAS_W ? w[k] : (ACC)1);
        pf += ak != 0 ? ak * f * ell : (ACC)0; /* no target mass: nothing, even at u = -inf */
        const ACC dk = -ak * fk;
        pg += dk;
        d[k] = dk;
    }
    *pf_out = pf;
    *pg_out = pg;
}

static void FN(dense_focal)(const ACC *restrict u, const ACC *restrict e, const ACC *restrict tr,
                            const ACC *restrict w, int64_t C, ACC keep, ACC uni, ACC lse, ACC inv_s,
                            ACC gam, int halves, ACC *restrict d, double *lf, double *lg) {
    double tf = 0.0, tg = 0.0;
    if (sizeof(ACC) == 8) halves = 0; /* see focal_halves: the double build has the exp/log loop only */
    const int mode = (tr != NULL) * 2 + (w != NULL);
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
        ACC pf = 0, pg = 0;
#define DENSE_CASE(P, T, W) \
    FN(dense_focal_seg)(u, e, tr, w, k0, k1, keep, uni, lse, inv_s, gam, d, &pf, &pg, P, T, W)
#define DENSE_POW(P)                                  \
    switch (mode) {                                   \
    case 0: DENSE_CASE(P, 0, 0); break;               \
    case 1: DENSE_CASE(P, 0, 1); break;               \
    case 2: DENSE_CASE(P, 1, 0); break;               \
    default: DENSE_CASE(P, 1, 1); break;              \
    }
        switch (halves) {
        case 2: DENSE_POW(2); break;
        case 3: DENSE_POW(3); break;
        case 4: DENSE_POW(4); break;
        case 5: DENSE_POW(5); break;
        case 6: DENSE_POW(6); break;
        case 7: DENSE_POW(7); break;
        case 8: DENSE_POW(8); break;
        case 9: DENSE_POW(9); break;
        case 10: DENSE_POW(10); break;
        default: DENSE_POW(0); break;
        }
#undef DENSE_POW
#undef DENSE_CASE
        tf += (double)pf;
        tg += (double)pg;
    }
    *lf = tf;
    *lg = tg;
}

/* The `halves` of dense_focal for a row's gamma: 2 gamma where gamma is a multiple of 1/2 in
 * 1..5 (the gammas of focal loss, 1, 2, 2.5, ..., and of FLSD-53, 5 and 3), else 0 (exp/log);
 * always 0 in double, where log and pow are libm's scalar calls anyway (gradcheck and the
 * float64 tests), which keeps the build small. */
static inline int FN(focal_halves)(double gam) {
    if (sizeof(ACC) == 8) return 0;
    const double h = 2.0 * gam;
    return (h >= 2.0 && h <= 10.0 && h == (double)(int)h) ? (int)h : 0;
}

/* Pass 2 of sm_row over classes [k0, k1): e = exp(u - m) into `ev` (which may be u itself: each
 * u[k] is read before ev[k] is written) and the sums *ps = sum e; with SEU *pe = sum e u (the
 * entropy's); with probability targets (T) *pa = sum a, *pau = sum a u (the loss and gradient
 * of cross-entropy), a = t~ w (w with W), and *pm = min t, the check that the targets are
 * probabilities, all in the one read of the target row. SEU, T and W are compile-time
 * constants: one vector loop each. */
ALWAYS_INLINE void FN(exp_pass_seg)(const ACC *u, const ACC *restrict tr, const ACC *restrict w, ACC m,
                                    ACC keep, ACC uni, ACC *ev, int64_t k0, int64_t k1, ACC *ps_out,
                                    ACC *pe_out, ACC *pa_out, ACC *pau_out, ACC *pm_out, const int SEU,
                                    const int T, const int W) {
    ACC ps = 0, pe = 0, pa = 0, pau = 0, pm = INFINITY;
    CE_PRAGMA(omp simd reduction(+ : ps, pe, pa, pau) reduction(min : pm))
    for (int64_t k = k0; k < k1; ++k) {
        const ACC uk = u[k], e = EXP(uk - m);
        ev[k] = e;
        ps += e;
        if (SEU) pe += e != 0 ? e * uk : (ACC)0; /* 0 log 0 = 0: a masked class adds 0 */
        if (T) {
            const ACC tk = tr[k], ak = (tk * keep + uni) * (W ? w[k] : (ACC)1);
            pa += ak;
            pau += ak != 0 ? ak * uk : (ACC)0; /* no target mass: nothing, even at u = -inf */
            pm = tk < pm ? tk : pm;
        }
    }
    *ps_out = ps;
    *pe_out = pe;
    *pa_out = pa;
    *pau_out = pau;
    *pm_out = pm;
}

/* u = c tanh(u / c) in place, `ic` = 1 / c. Per block of SEG classes, the largest |u| / c picks
 * the loop: all below TANH_SMALL_MAX, tanh's polynomial alone (a cap above the logits, the
 * usual case); else the whole tanh, its exp and division, for every class of the block. The
 * two give the same value where both apply. */
static void FN(softcap_row)(ACC *restrict u, int64_t C, ACC c, ACC ic) {
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
        ACC big = 0;
        SIMD_MAX(big)
        for (int64_t k = k0; k < k1; ++k) {
            const ACC v = u[k] < 0 ? -u[k] : u[k];
            big = v > big ? v : big;
        }
        if (big * ic < (ACC)TANH_SMALL_MAX) {
            for (int64_t k = k0; k < k1; ++k) u[k] = c * TANH_SMALL(u[k] * ic);
        } else {
            for (int64_t k = k0; k < k1; ++k) u[k] = c * TANH(u[k] * ic);
        }
    }
}

/* One row r: x row `xr` (dtype x_dtype, contiguous), gradient row `gr` (g_dtype) or NULL,
 * probability-target row `tr` or NULL; `scr` is this thread's 4 scratch rows of C (u, g, e =
 * exp(u - m), the dense term D). Writes the row's loss (and -log q_y, or -log sum_k t_k q_k for
 * probability targets) and returns the loss as stored; sets *t_negative where a probability
 * target of the row is below 0 (a NaN is not). */
static double FN(sm_row)(const FN(sm_ctx) *ctx, int64_t r, const void *xr, int x_dtype, char *gr, int g_dtype,
                         const ACC *tr, ACC *scr, int *t_negative) {
    const sm_args *a = ctx->a;
    const int64_t C = a->n_cols;
    ACC *ubuf = scr, *gbuf = scr + C, *ebuf = scr + 2 * C, *dbuf = scr + 3 * C;
    const ACC *w = (const ACC *)a->w;
    const int index = a->y != NULL;
    const int cap = a->softcap > 0;
    const int need_u = x_dtype != ACC_DT || cap;
    const int need_g = gr != NULL && g_dtype != ACC_DT;
    const double eps = a->eps;
    const ACC keep = (ACC)(1.0 - eps), uni = (ACC)(eps / (double)C); /* t~ = t (1 - eps) + eps / C */
    const double sc = ctx->scale;
    ACC *loss_out = (ACC *)a->loss;
    ACC *ell_out = (ACC *)a->ell;
    const ACC *u = (const ACC *)xr;
    ACC *st = a->stats ? (ACC *)a->stats + 3 * r : NULL; /* this row's statistics, or NULL */
    /* the focusing parameter of this row: fixed, per row, or (a step schedule) chosen after pass
     * 2, from the row's true-class probability. The focal term needs every class (it is "dense")
     * with probability targets and with label smoothing; before the step is chosen, may_dense
     * says whether it can be, may_plain whether the row sums of the plain formulas can be needed */
    const int step = a->has_step != 0;
    double gam = a->gamma_rows ? (double)((const ACC *)a->gamma_rows)[r] : a->gamma;
    const int spread = !index || eps != 0.0;
    const int may_dense = spread && (step ? (a->step_below != 0.0 || a->step_above != 0.0) : gam != 0.0);
    const int may_plain = !may_dense || (step && (a->step_below == 0.0 || a->step_above == 0.0));
    /* half precision without softcap: the conversion and the max in one read */
    const int load_max = need_u && !cap && !(index && eps != 0.0);
    ACC m_loaded = -INFINITY;
    if (load_max) {
        m_loaded = FN(load_max)(ubuf, xr, x_dtype, C);
        u = ubuf;
    } else if (need_u) {
        FN(load)(ubuf, xr, x_dtype, 0, C);
        if (cap) FN(softcap_row)(ubuf, C, (ACC)a->softcap, (ACC)(1.0 / a->softcap));
        u = ubuf;
    }
    ACC *g = need_g ? gbuf : (ACC *)gr;

    /* sample weight s = w_y; ignored rows weigh 0 and contribute nothing */
    int64_t y = -1;
    double s = 1.0;
    if (index) {
        y = a->y[r];
        s = y == a->ignore_index ? 0.0 : (w ? (double)w[y] : 1.0);
        if (s == 0.0) {
            if (loss_out) loss_out[r] = 0;
            if (ell_out) ell_out[r] = 0;
            if (st) st[0] = st[1] = st[2] = 0; /* masked by the caller */
            if (gr) {
                for (int64_t k = 0; k < C; ++k) g[k] = 0;
                if (need_g) FN(store)(gr, g_dtype, 0, gbuf, C);
            }
            return 0.0;
        }
    }

    /* pass 1: the max (log-sum-exp is taken relative to it, so exp never overflows and
     * the largest term is 1), and the row sums of the loss */
    ACC m;
    double su = 0.0, sa = 0.0, sau = 0.0;
    if (index && eps != 0.0 && may_plain) {
        m = FN(row_max_sum)(u, w, C, &su); /* and sum_k w_k u_k, in the same read */
    } else {
        m = load_max ? m_loaded : FN(row_max)(u, C);
    }
    /* the statistics' argmax: the first class whose u equals the max (ties go to the first, as
     * torch.argmax), found while the row is still in L1 from the max pass and before pass 2 may
     * overwrite u; for probability targets also the target row's first argmax */
    int64_t hit = 0;
    if (st) {
        const int64_t am = FN(first_equal)(u, C, m);
        int64_t tgt = y;
        if (!index) {
            ACC tm = -INFINITY;
            SIMD_MAX(tm)
            for (int64_t k = 0; k < C; ++k) tm = tr[k] > tm ? tr[k] : tm;
            tgt = FN(first_equal)(tr, C, tm); /* -1 when the target row has no max (NaN) */
        }
        hit = am >= 0 && am == tgt;
    }
    /* pass 2: e = exp(u - m) and S = sum e, in float partial sums of SEG terms added in double.
     * e is kept for the later passes in the gradient row whenever it can be (pass 3 then
     * overwrites each entry in place, and the row's first write to memory overlaps the exp
     * here rather than stalling pass 3), else in the scratch row `ebuf`: when g is u itself
     * (inplace_backward on ACC logits without softcap) and a later pass still reads u (the
     * dense pass, the confidence penalty), or with Poly-1 and probability targets, whose
     * pass 3 reads e after g is written. */
    const int g_is_u = (const ACC *)g == u;
    const int keep_e = gr != NULL && !(g_is_u && (may_dense || a->conf != 0.0)) && (index || a->poly1 == 0.0);
    /* sum e u, for the entropy H = lse - sum q u (the confidence penalty and the statistics) */
    const int want_seu = a->conf != 0.0 || st != NULL;
    ACC *ev = keep_e ? g : ebuf;
    const ACC u_y_acc = index ? u[y] : (ACC)0; /* read before g, which may alias u, is written */
    double S = 0.0, Seu = 0.0, Set = 0.0, St = 0.0;
    ACC tmin = INFINITY;
    const int mode = want_seu * 4 + (tr != NULL) * 2 + (tr != NULL && w != NULL);
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        const int64_t k1 = C - k0 < SEG ? C : k0 + SEG, n = k1 - k0;
        ACC ps = 0, pe = 0, pa = 0, pau = 0, pm = INFINITY;
#define EXP_CASE(SEU, T, W) \
    FN(exp_pass_seg)(u, tr, w, m, keep, uni, ev, k0, k1, &ps, &pe, &pa, &pau, &pm, SEU, T, W)
        switch (mode) {
        case 0: EXP_CASE(0, 0, 0); break;
        case 2: EXP_CASE(0, 1, 0); break;
        case 3: EXP_CASE(0, 1, 1); break;
        case 4: EXP_CASE(1, 0, 0); break;
        case 6: EXP_CASE(1, 1, 0); break;
        default: EXP_CASE(1, 1, 1); break;
        }
#undef EXP_CASE
        S += (double)ps;
        Seu += (double)pe;
        sa += (double)pa;
        sau += (double)pau;
        tmin = pm < tmin ? pm : tmin;
        if (!index && a->poly1 != 0.0) { /* sum e t~, for P = sum q t~ */
            ACC pe = 0;
            SIMD_SUM(pe)
            for (int64_t k = k0; k < k0 + n; ++k) pe += ev[k] * (tr[k] * keep + uni);
            Set += (double)pe;
        }
        if (!index && (ell_out || step)) { /* sum e t, for the probability a focal schedule reads */
            ACC pe = 0;
            SIMD_SUM(pe)
            for (int64_t k = k0; k < k0 + n; ++k) pe += ev[k] * tr[k];
            St += (double)pe;
        }
    }
    if (tmin < 0 && t_negative) *t_negative = 1;
    const double lse = (double)m + log(S);
    if (st) {
        st[0] = (ACC)lse;
        st[1] = (ACC)(lse - Seu / S);
        st[2] = (ACC)hit;
    }
    if (step) {
        /* the probability the schedule reads, in ACC as the operator true_class_prob gives it:
         * q_y = exp(-ell_y) for class indices, sum_k t_k q_k for probability targets */
        const ACC ell_p = (ACC)(lse - (double)u_y_acc);
        const ACC p = index ? (ACC)exp(-(double)ell_p) : (ACC)(St / S);
        gam = p < (ACC)a->step_threshold ? a->step_below : a->step_above;
    }
    const int dense = gam != 0.0 && spread;

    /* the dense focal term: D in dbuf, the row sums of a f ell and of D */
    double lf = 0.0, lg = 0.0;
    if (dense)
        FN(dense_focal)(u, ev, tr, w, C, keep, uni, (ACC)lse, (ACC)(1.0 / S), (ACC)gam, FN(focal_halves)(gam),
                        dbuf, &lf, &lg);

    /* per-row scalars (double) */
    double loss, rowc, sparse = 0.0, rowconst = 0.0, ow = 0.0, cpc = 0.0, pc = 0.0;
    double ell_y = 0.0, u_y = 0.0, omq_y = 0.0, q_y = 0.0; /* -log q_y, u_y, 1 - q_y, q_y */
    if (index) {
        u_y = (double)u_y_acc;
        ell_y = lse - u_y; /* -log q_y, exact even where q_y underflows */
        /* the uniform part's sums: in closed form for cross-entropy, sum_k w_k ell_k =
         * lse sum(w) - sum w u and sum_k w_k g_k = -sum(w); from the dense pass for focal */
        const double uf = dense ? lf : lse * a->w_sum - su, ug = dense ? lg : -a->w_sum;
        omq_y = -expm1(-ell_y);
        q_y = exp(-ell_y);
        FN(coef_d)(s, 1.0, lse, ell_y, omq_y, q_y, uf, ug, gam, 1.0 - eps,
                   eps / (double)C, a->w_sum, a->z_loss, a->poly1, w != NULL, dense,
                   &loss, &rowc, &sparse, &rowconst, &ow);
    } else {
        /* dense target mass a = t~ w: L = sum a f ell, G = -q sum(a g) + a g; for
         * cross-entropy (g = -1) L = lse sum(a) - sum a u, G = q sum(a) - a */
        loss = dense ? lf : sa * lse - sau;
        rowc = dense ? -lg : sa;
        if (a->z_loss != 0.0) { /* z-loss (PaLM): lambda lse^2, d/du = 2 lambda lse q */
            loss += a->z_loss * lse * lse;
            rowc += 2.0 * a->z_loss * lse;
        }
        if (ell_out) ell_y = log(S) - log(St); /* -log sum_k t_k q_k */
    }
    if (a->conf != 0.0) {
        /* -beta H(q) (Pereyra et al. 2017); d(-beta H)/du = beta q (H - lse) + beta q u */
        const double H = lse - Seu / S;
        loss -= s * a->conf * H;
        rowc += s * a->conf * (H - lse);
        cpc = s * a->conf;
    }
    if (!index && a->poly1 != 0.0) { /* Poly-1 (Leng et al. 2022): eps1 (1 - P), P = sum t~ q */
        const double P = Set / S;
        loss += a->poly1 * (1.0 - P);
        rowc += a->poly1 * P;
        pc = a->poly1;
    }
    if (loss_out) loss_out[r] = (ACC)loss;
    const double stored = (double)(ACC)loss; /* the sum matches a sum of the returned losses */
    if (ell_out) ell_out[r] = (ACC)ell_y;
    if (!gr) return stored;

    /* pass 3: G = scale (q (rowc + cpc u - pc t~) + rowconst + ow w + Dc D - a), q = e / S with
     * e = exp(u - m) from pass 2. u - m (not u - lse): m is one of the row's values, so the
     * difference is exact where it matters, even at logits of 1e4 */
    const ACC A = (ACC)(rowc * sc / S), B = (ACC)(rowconst * sc);
    const ACC Cp = (ACC)(cpc * sc / S), Pc = (ACC)(pc * sc / S), Ow = (ACC)(ow * sc), Ad = (ACC)sc;
    /* the dense term's scale: eps / C for the uniform part of class indices */
    const ACC Dc = (ACC)(sc * (index ? eps / (double)C : 1.0));
    /* half-precision gradient of the common case: scaled and rounded in one loop */
    const int fused_store = keep_e && need_g && !tr && !(w && Ow != 0) && !cap && Cp == 0 && !dense;
    /* probability targets without a focal term: G = q rowc + rowconst - a, a = t~ w, one loop */
    const int prob_fused = tr && !dense && Cp == 0 && Pc == 0;
    if (prob_fused && w) {
        for (int64_t k = 0; k < C; ++k) g[k] = ev[k] * A + B - Ad * (tr[k] * keep + uni) * w[k];
    } else if (prob_fused) {
        for (int64_t k = 0; k < C; ++k) g[k] = ev[k] * A + B - Ad * (tr[k] * keep + uni);
    } else if (fused_store) {
        FN(store_affine)(gr, g_dtype, g, A, B, C);
    } else if (Cp == 0 && dense) {
        for (int64_t k = 0; k < C; ++k) g[k] = ev[k] * A + dbuf[k] * Dc + B;
    } else if (Cp == 0) {
        for (int64_t k = 0; k < C; ++k) g[k] = ev[k] * A + B;
    } else {
        for (int64_t k = 0; k < C; ++k) {
            const ACC e = ev[k];
            /* q u -> 0 where q = 0, u = -inf */
            g[k] = (e != 0 ? e * (A + Cp * u[k]) : (ACC)0) + (dense ? dbuf[k] * Dc : (ACC)0) + B;
        }
    }
    /* the rarer terms, each one more pass over the row in cache */
    if (w && Ow != 0 && !fused_store)
        for (int64_t k = 0; k < C; ++k) g[k] += Ow * w[k];
    if (tr) {
        if (Pc != 0)
            for (int64_t k = 0; k < C; ++k) g[k] -= ev[k] * Pc * (tr[k] * keep + uni);
        if (dense || prob_fused) {
            /* -a is in D, or in the loop above */
        } else if (w) {
            for (int64_t k = 0; k < C; ++k) g[k] -= Ad * (tr[k] * keep + uni) * w[k];
        } else {
            for (int64_t k = 0; k < C; ++k) g[k] -= Ad * (tr[k] * keep + uni);
        }
    }
    if (cap) {
        const ACC ic = (ACC)(1.0 / a->softcap);
        for (int64_t k = 0; k < C; ++k) {
            const ACC th = u[k] * ic; /* d/dx [c tanh(x/c)] = 1 - tanh^2 */
            g[k] *= (ACC)1 - th * th;
        }
    }
    if (index) {
        /* the target entry: rowc q_y - sparse = -rowc (1 - q_y) + (rowc - sparse), in double
         * with 1 - q_y = -expm1(-ell_y), so it stays exact where q_y -> 1 */
        double v = -rowc * omq_y + (rowc - sparse) + rowconst + cpc * q_y * u_y;
        if (w) v += ow * (double)w[y];
        v *= sc;
        if (cap) {
            const double th = u_y / a->softcap;
            v *= 1.0 - th * th;
        }
        g[y] = (ACC)v;
        if (fused_store) FN(store)(gr, g_dtype, y, g + y, 1);
    }
    if (need_g && !fused_store) FN(store)(gr, g_dtype, 0, gbuf, C);
    return stored;
}

/* rows [r0, r1) of (N, C) logits with rows at a stride */
static void FN(sm_work)(void *vctx, int64_t r0, int64_t r1, int tid) {
    FN(sm_ctx) *ctx = (FN(sm_ctx) *)vctx;
    const sm_args *a = ctx->a;
    ACC *scr = ctx->scratch + (int64_t)tid * ctx->per_thread;
    const size_t xsz = dtype_size(a->x_dtype), gsz = dtype_size(a->g_dtype);
    double total = 0.0;
    int t_negative = 0;
    for (int64_t r = r0; r < r1; ++r) {
        const char *xr = (const char *)a->x + (size_t)(r * a->x_row_stride) * xsz;
        char *gr = a->grad ? (char *)a->grad + (size_t)(r * a->g_row_stride) * gsz : NULL;
        const ACC *tr = a->t ? (const ACC *)a->t + r * a->t_row_stride : NULL;
        total += FN(sm_row)(ctx, r, xr, a->x_dtype, gr, a->g_dtype, tr, scr, &t_negative);
    }
    ctx->partial[tid] = total;
    ctx->t_negative[tid] = t_negative;
}

/* (N, C, S) logits (class dim in the middle, S = the product of the trailing dims; index
 * targets): tiles of `tile` positions of one sample are transposed into (tile, C) rows in this
 * thread's scratch (converted to ACC), run through sm_row, and their gradient transposed back.
 * Each tile is read from memory once and written once; the transposes happen in cache. */
static void FN(sm_work_spatial)(void *vctx, int64_t t0, int64_t t1, int tid) {
    FN(sm_ctx) *ctx = (FN(sm_ctx) *)vctx;
    const sm_args *a = ctx->a;
    const int64_t C = a->n_cols, S = a->spatial, B = ctx->tile;
    const int64_t tiles_per_n = (S + B - 1) / B;
    ACC *scr = ctx->scratch + (int64_t)tid * ctx->per_thread; /* 4 rows of C for sm_row */
    ACC *xt = scr + 4 * C; /* (B, C) logits, row-major */
    ACC *gt = xt + B * C; /* (B, C) gradient */
    double total = 0.0;
    for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n = tile / tiles_per_n, s0 = (tile % tiles_per_n) * B;
        const int64_t nb = S - s0 < B ? S - s0 : B;
        const int64_t base = n * C * S + s0; /* element (n, c, s0 + j) is base + c S + j */
        for (int64_t c = 0; c < C; ++c) {
            ACC tmp[256];
            for (int64_t j0 = 0; j0 < nb; j0 += 256) {
                const int64_t m = nb - j0 < 256 ? nb - j0 : 256;
                FN(load)(tmp, a->x, a->x_dtype, base + c * S + j0, m);
                for (int64_t j = 0; j < m; ++j) xt[(j0 + j) * C + c] = tmp[j];
            }
        }
        for (int64_t j = 0; j < nb; ++j)
            total += FN(sm_row)(ctx, n * S + s0 + j, xt + j * C, ACC_DT, a->grad ? (char *)(gt + j * C) : NULL,
                                ACC_DT, NULL, scr, NULL);
        if (a->grad) {
            for (int64_t c = 0; c < C; ++c) {
                ACC tmp[256];
                for (int64_t j0 = 0; j0 < nb; j0 += 256) {
                    const int64_t m = nb - j0 < 256 ? nb - j0 : 256;
                    for (int64_t j = 0; j < m; ++j) tmp[j] = gt[(j0 + j) * C + c];
                    FN(store)(a->grad, a->g_dtype, base + c * S + j0, tmp, m);
                }
            }
        }
    }
    ctx->partial[tid] = total;
}

/* (N, C, S) logits with few classes: whole tiles of positions at once, vectorised across the
 * positions (a row of C = 21 classes is too short to vectorise over, and a per-row call costs
 * more than its arithmetic). The layout needs no transpose: for each class the tile's logits
 * and gradient are contiguous. Covers index targets with class weights, ignore_index,
 * smoothing, a fixed focal gamma (without smoothing), z-loss, Poly-1 and the statistics of
 * return_aux (the argmax tracked in pass 1, sum e u in pass 2); the same formulas as
 * sm_row, with the per-position scalars in ACC arithmetic. 1 - q_y is the sum of the other
 * classes' exponentials over S, never 1 - q_y, so it keeps its precision as q_y -> 1. */
static void FN(sm_work_columns)(void *vctx, int64_t t0, int64_t t1, int tid) {
    FN(sm_ctx) *ctx = (FN(sm_ctx) *)vctx;
    const sm_args *a = ctx->a;
    const int64_t C = a->n_cols, S = a->spatial, B = ctx->tile;
    const int64_t tiles_per_n = (S + B - 1) / B;
    const ACC *w = (const ACC *)a->w;
    const double eps = a->eps;
    const ACC gam = (ACC)a->gamma, zl = (ACC)a->z_loss, p1 = (ACC)a->poly1;
    const ACC keep = (ACC)(1.0 - eps), uni = (ACC)(eps / (double)C), wsum = (ACC)a->w_sum;
    const ACC sc = (ACC)ctx->scale;
    ACC *scr = ctx->scratch + (int64_t)tid * ctx->per_thread;
    ACC *E = scr;             /* (C, B): exp(u - m), then nothing */
    ACC *tmp = E + C * B;     /* (B): one class's logits, converted */
    ACC *m = tmp + B, *Ssum = m + B, *Sn = Ssum + B, *su = Sn + B, *uy = su + B, *sw = uy + B;
    ACC *A = sw + B, *Bc = A + B, *Ow = Bc + B, *Gy = Ow + B, *gout = Gy + B;
    ACC *am = gout + B, *seu = am + B; /* the statistics: first argmax (as ACC) and sum e u */
    int64_t *yv = (int64_t *)(seu + B);
    ACC *stats = (ACC *)a->stats;
    ACC *loss_out = (ACC *)a->loss;
    double total = 0.0;
    for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n = tile / tiles_per_n, s0 = (tile % tiles_per_n) * B;
        const int64_t nb = S - s0 < B ? S - s0 : B;
        const int64_t base = n * C * S + s0, r0 = n * S + s0;
        for (int64_t j = 0; j < nb; ++j) {
            const int64_t y = a->y[r0 + j];
            const int ok = y != a->ignore_index;
            yv[j] = ok ? y : -1; /* -1 matches no class: an ignored position has no target entry */
            sw[j] = ok ? (w ? w[y] : (ACC)1) : (ACC)0;
            m[j] = -INFINITY;
            Ssum[j] = Sn[j] = su[j] = uy[j] = am[j] = seu[j] = 0;
        }
        /* pass 1: max, sum_c w_c u_c, u_y */
        for (int64_t c = 0; c < C; ++c) {
            const ACC *xc = (const ACC *)a->x + base + c * S;
            if (a->x_dtype != ACC_DT) {
                FN(load)(tmp, a->x, a->x_dtype, base + c * S, nb);
                xc = tmp;
            }
            const ACC wc = w ? w[c] : (ACC)1;
            if (stats) {
                /* a strictly larger value moves the argmax: ties stay with the first class */
                for (int64_t j = 0; j < nb; ++j) {
                    const ACC v = xc[j];
                    am[j] = v > m[j] ? (ACC)c : am[j];
                    m[j] = v > m[j] ? v : m[j];
                    su[j] += wc * v;
                    uy[j] = c == yv[j] ? v : uy[j];
                }
            } else {
                for (int64_t j = 0; j < nb; ++j) {
                    const ACC v = xc[j];
                    m[j] = v > m[j] ? v : m[j];
                    su[j] += wc * v;
                    uy[j] = c == yv[j] ? v : uy[j];
                }
            }
        }
        /* pass 2: exponentials, their sum, and the sum over the other classes */
        for (int64_t c = 0; c < C; ++c) {
            const ACC *xc = (const ACC *)a->x + base + c * S;
            if (a->x_dtype != ACC_DT) {
                FN(load)(tmp, a->x, a->x_dtype, base + c * S, nb);
                xc = tmp;
            }
            ACC *ec = E + c * B;
            for (int64_t j = 0; j < nb; ++j) {
                const ACC e = EXP(xc[j] - m[j]);
                ec[j] = e;
                Ssum[j] += e;
                Sn[j] += c == yv[j] ? (ACC)0 : e;
            }
            if (stats)
                for (int64_t j = 0; j < nb; ++j)
                    seu[j] += ec[j] != 0 ? ec[j] * xc[j] : (ACC)0; /* 0 log 0 = 0 */
        }
        if (stats) /* lse, H = lse - sum q u and the argmax hit of each position (see sm_row) */
            for (int64_t j = 0; j < nb; ++j) {
                ACC *st = stats + 3 * (r0 + j);
                const ACC lse = m[j] + LOG(Ssum[j]);
                st[0] = lse;
                st[1] = lse - seu[j] / Ssum[j];
                st[2] = yv[j] >= 0 && am[j] == (ACC)yv[j] ? (ACC)1 : (ACC)0;
            }
        /* per-position scalars (see sm_row); ignored positions get all-zero coefficients */
        ACC part = 0;
        SIMD_SUM(part)
        for (int64_t j = 0; j < nb; ++j) {
            const ACC s = sw[j], valid = yv[j] >= 0 ? (ACC)1 : (ACC)0;
            const ACC lse = m[j] + LOG(Ssum[j]);
            const ACC ell = valid > 0 ? lse - uy[j] : (ACC)0;
            const ACC omq = Sn[j] / Ssum[j], qy = (Ssum[j] - Sn[j]) / Ssum[j];
            ACC loss, rowc, sparse, rowconst, ow;
            FN(coef_a)(s, valid, lse, ell, omq, qy, lse * wsum - su[j], -wsum, gam, keep, uni, wsum, zl, p1,
                       w != NULL, 0, &loss, &rowc, &sparse, &rowconst, &ow);
            loss = valid > 0 ? loss : (ACC)0;
            uy[j] = loss; /* u_y and m are not needed any more: their slots keep loss and ell */
            m[j] = ell;
            part += loss;
            A[j] = valid > 0 ? rowc * sc / Ssum[j] : (ACC)0;
            Bc[j] = rowconst * sc;
            Ow[j] = ow * sc;
            /* the target entry: rowc q_y - sparse = -rowc (1 - q_y) + (rowc - sparse) */
            /* with class weights, sw = w_y on kept positions */
            Gy[j] = sc * (-rowc * omq + (rowc - sparse) + rowconst + ow * sw[j]);
        }
        if (loss_out)
            for (int64_t j = 0; j < nb; ++j) loss_out[r0 + j] = uy[j];
        if (a->ell)
            for (int64_t j = 0; j < nb; ++j) ((ACC *)a->ell)[r0 + j] = m[j];
        total += (double)part;
        if (!a->grad) continue;
        /* pass 3: the gradient, one class at a time, contiguous across the tile */
        for (int64_t c = 0; c < C; ++c) {
            const ACC *ec = E + c * B;
            const ACC wc = w ? w[c] : (ACC)0;
            ACC *gc = a->g_dtype == ACC_DT ? (ACC *)a->grad + base + c * S : gout;
            for (int64_t j = 0; j < nb; ++j) {
                const ACC g = ec[j] * A[j] + Bc[j] + Ow[j] * wc;
                /* an ignored position (yv = -1) gets 0 whatever its logits hold (nan, inf) */
                gc[j] = c == yv[j] ? Gy[j] : (yv[j] >= 0 ? g : (ACC)0);
            }
            if (gc == gout) FN(store)(a->grad, a->g_dtype, base + c * S, gout, nb);
        }
    }
    ctx->partial[tid] = total;
}

CE_API int FN(ce_softmax)(sm_args *a) {
    const int64_t C = a->n_cols;
    const int spatial = a->spatial > 1;
    FN(sm_ctx) ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.a = a;
    ctx.scale = a->scale;
    /* (N, C, S) logits: tiles of positions whose (tile, C) blocks of logits and gradient stay
     * in cache (2 x 128 KiB of fp32) */
    /* few classes and the options sm_work_columns covers: vectorise across positions */
    const int columns = spatial && C <= 256 && a->softcap <= 0 && a->conf == 0.0 && a->gamma_rows == NULL
                        && !a->has_step && !(a->gamma != 0.0 && a->eps != 0.0);
    ctx.tile = spatial ? (columns ? 256 : (C < 32768 ? 32768 / C : 1)) : 0;
    if (spatial && ctx.tile > a->spatial) ctx.tile = a->spatial;
    const int64_t units = spatial ? (a->n_rows / a->spatial) * ((a->spatial + ctx.tile - 1) / ctx.tile)
                                  : a->n_rows;
    /* about 64K elements of work per thread at least: starting a thread costs microseconds */
    int64_t work = a->n_rows * C;
    int threads = (int)(work / 65536 + 1);
    if (threads > a->n_threads) threads = a->n_threads;
    if (threads > units) threads = (int)units;
    if (threads < 1) threads = 1;
    if (a->mean) {
        /* PyTorch's mean: the sum over kept rows of w_y (index targets), else the row count;
         * a zero denominator (all rows ignored, or an empty batch) gives 0, not 0/0 */
        double denom = (double)a->n_rows;
        if (a->y) {
            const ACC *w = (const ACC *)a->w;
            denom = 0.0;
            for (int64_t r = 0; r < a->n_rows; ++r) {
                const int64_t y = a->y[r];
                if (y != a->ignore_index) denom += w ? (double)w[y] : 1.0;
            }
        }
        a->denom = denom;
        ctx.scale = denom > 0.0 ? a->scale / denom : 0.0;
    }
    ctx.per_thread = columns ? (C + 18) * ctx.tile : 4 * C + (spatial ? 2 * ctx.tile * C : 0);
    ctx.scratch = (ACC *)malloc((size_t)(ctx.per_thread * threads) * sizeof(ACC));
    if (!ctx.scratch) return -1;
    if (columns)
        parallel_for(units, threads, FN(sm_work_columns), &ctx);
    else if (spatial)
        parallel_for(units, threads, FN(sm_work_spatial), &ctx);
    else
        parallel_for(a->n_rows, threads, FN(sm_work), &ctx);
    free(ctx.scratch);
    double total = 0.0;
    a->t_negative = 0;
    for (int t = 0; t < MAX_THREADS; ++t) {
        total += ctx.partial[t];
        a->t_negative |= ctx.t_negative[t];
    }
    a->total = a->mean ? (a->denom > 0.0 ? total / a->denom : 0.0) : total;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Sigmoid family: elementwise, in segments of at most SEG elements.
 *
 * Per element, with p = sigmoid(x), the (smoothed) target t, pos_weight pw, weight w:
 *   b = pw t (-log p) + (1 - t)(-log(1 - p_m)),  p_m = max(p - clip, 0)
 *   L = w alpha_t (1 - p_t)^gamma_t b,           1 - p_t = t (1 - p) + (1 - t) p_m
 * and its gradient, as derived in crossent/backends/torch_ops/binary.py. One exp and one log per element
 * (a second log for the clipped negative term of soft targets):
 * e = exp(-|x|) gives p, 1 - p (never as 1 - p, which rounds to 0 for x > 17 in fp32) and
 * log(1 + e), from which -log p = max(-x, 0) + log1p(e) and -log(1 - p) = max(x, 0) + log1p(e). */

typedef struct {
    const bce_args *a;
    double scale;
    double partial[MAX_THREADS];
} FN(bce_ctx);

/* x^n for an integer n in 0..8 that is the same for the whole loop: selects on its bits, no
 * branch and no exp/log, so that the loop around it vectorises */
ALWAYS_INLINE ACC FN(powi)(ACC x, int n) {
    const ACC x2 = x * x, x4 = x2 * x2;
    const ACC lo = ((n & 1) ? x : (ACC)1) * ((n & 2) ? x2 : (ACC)1) * ((n & 4) ? x4 : (ACC)1);
    return (n & 8) ? x4 * x4 : lo;
}

ALWAYS_INLINE void FN(bce_seg)(const bce_args *a, const ACC sc, int64_t L, const ACC *restrict xp, const ACC *restrict tp,
                               const unsigned char *restrict kp, const ACC *restrict wp,
                               const ACC *restrict pwp, ACC *restrict lp,
                               ACC *restrict gp, const int FOCAL, const int CLIP, const int GRAD) {
    /* FOCAL: 0 none, 1 gamma_pos = gamma_neg = 2 (a square), 2 general (exp(gamma log)), 3 hard
     * targets (every t in {0, 1}) with integer gammas in 0..8 (by multiplication, see powi) */
    const ACC keep = (ACC)(1.0 - a->eps), half = (ACC)(a->eps / 2.0);
    const ACC gpos = (ACC)a->gamma_pos, gneg = (ACC)a->gamma_neg, c = (ACC)a->clip;
    /* alpha_t = alpha t + (1 - alpha)(1 - t) = a0 + a1 t; 1 when alpha is off */
    const ACC a0 = a->alpha >= 0 ? (ACC)(1.0 - a->alpha) : (ACC)1;
    const ACC a1 = a->alpha >= 0 ? (ACC)(2.0 * a->alpha - 1.0) : (ACC)0;
    const int ipos = (int)a->gamma_pos, ineg = (int)a->gamma_neg; /* FOCAL 3: integers */
    /* kp: 1 where the element counts, 0 where its target is ignore_index (see ignore_keep) */
    for (int64_t k = 0; k < L; ++k) {
        const ACC x = xp[k], t0 = tp[k];
        const int valid = kp[k] != 0;
        const ACC t = (valid ? t0 : (ACC)0) * keep + half; /* towards 1/2: t (1 - eps) + eps/2 */
        const ACC ax = x < 0 ? -x : x;
        const ACC e = EXP(-ax);
        const ACC w1 = (ACC)1 + e;
        const ACC r = (ACC)1 / w1;
        const ACC er = e * r;
        const ACC p = x >= 0 ? r : er;
        const ACC q = x >= 0 ? er : r; /* 1 - p */
        /* where p > clip, 1 - p_m = (1 - p) + clip: a sum of positives, formed without the
         * cancellation of 1 - p_m, so a plain log (no log1p) is exact to rounding; 1 / (q + c)
         * serves the gradient too. Where p <= clip, p_m = 0 and the term is -log 1 = 0. */
        const ACC qc = q + c;
        /* Hard targets with a clip (FOCAL 3): a positive needs only -log p, a negative only
         * -log(1 - p_m), so one log of the argument its side needs; the other side's value is
         * finite (w1 >= 1, qc >= clip > 0) and dropped below by a select, not a product. */
        const ACC lw = LOG(CLIP && FOCAL == 3 && t < (ACC)0.5 ? qc : w1);
        /* log1p(e) from log: log(w1) - ((w1 - 1) - e) / w1 corrects the rounding of w1 = fl(1 + e)
         * (Goldberg's trick); for e below the epsilon w1 = 1 and the result is e itself */
        const ACC l1 = lw - ((w1 - (ACC)1) - e) * r;
        const ACC ellp = (x < 0 ? -x : (ACC)0) + l1; /* -log p = softplus(-x) */
        ACC elln = (x > 0 ? x : (ACC)0) + l1;        /* -log(1 - p) = softplus(x) */
        ACC pm = p, iqc = 0;
        if (CLIP) {
            pm = p - c;
            pm = pm > 0 ? pm : (ACC)0; /* the shifted probability of the asymmetric loss */
            iqc = (ACC)1 / qc;
            elln = pm > 0 ? -(FOCAL == 3 ? lw : LOG(qc)) : (ACC)0;
        }
        const ACC pw = pwp[k];
        /* a side without target mass adds nothing, even at an infinite logit (a masked
         * negative, x = -inf and t = 0: 0 * inf would be NaN where the loss is 0) */
        const ACC b = (t > 0 ? pw * t * ellp : (ACC)0) + (t < 1 ? ((ACC)1 - t) * elln : (ACC)0);
        const ACC mult = (a0 + a1 * t) * wp[k];
        ACC factor = 1, gt = 0, denom = 0;
        if (FOCAL) {
            gt = gpos * t + gneg * ((ACC)1 - t);
            denom = t * q + ((ACC)1 - t) * pm; /* 1 - p_t: a convex combination, no cancellation */
            if (FOCAL == 1) {
                factor = denom * denom;
            } else if (FOCAL == 3) {
                /* t = 1: (1 - p)^gamma_pos, t = 0: p_m^gamma_neg; both formed, one kept */
                const ACC fpos = FN(powi)(q, ipos), fneg = FN(powi)(pm, ineg);
                factor = t > (ACC)0.5 ? fpos : fneg;
            } else {
                /* (1 - p_t)^gamma_t = exp(gamma_t log(1 - p_t)), one log and one exp per element,
                 * vectorised; the log clamped at LOG_MIN (1 - p_t = 0 gives exp(gamma_t LOG_MIN),
                 * 0 for gamma_t >= 2 and at most 1e-19 for gamma_t >= 0.5 in fp32, never the NaN
                 * of 0 * log 0), so that a gamma_t of 0 gives exactly exp(0) = 1 */
                ACC lo = LOG_POS(denom);
                lo = lo > LOG_MIN ? lo : LOG_MIN;
                factor = EXP(gt * lo);
            }
        }
        lp[k] = valid ? mult * factor * b : (ACC)0;
        if (GRAD) {
            const ACC s = p * q; /* dp/dx */
            ACC db;
            if (CLIP) {
                /* d[-log(1 - p_m)]/dx = m s / (1 - p_m), 1 - p_m = (1 - p) + clip where p > clip */
                const ACC dn = pm > 0 ? s * iqc : (ACC)0;
                db = ((ACC)1 - t) * dn - pw * t * q;
            } else {
                db = ((ACC)1 - t) * p - pw * t * q; /* not p - t: keeps the -(1 - p) of a positive */
            }
            ACC gr = db;
            if (FOCAL) {
                /* D = d(1 - p_t)/dx = s [m (1 - t) - t]; gamma_t (1-p_t)^(gamma_t - 1) D b is
                 * written gamma_t F (D / (1 - p_t)) b with a finite ratio (see binary.py) */
                const ACC D = CLIP ? s * ((pm > 0 ? (ACC)1 : (ACC)0) * ((ACC)1 - t) - t) : s * ((ACC)1 - (ACC)2 * t);
                const ACC dd = denom > TINY ? denom : TINY;
                gr = factor * (gt * (D / dd) * b + db);
            }
            gp[k] = valid ? sc * mult * gr : (ACC)0;
        }
    }
}

/* The weight of elements [i, i + L): a pointer into `base` where the index runs linearly
 * (inner == 1), else `buf` filled with the one value of a constant run. Returns the run's
 * length (<= L). */
static inline int64_t FN(weight_run)(const ACC *base, int64_t inner, int64_t period, int64_t i, int64_t L,
                                     ACC *buf, const ACC **out) {
    const int64_t outer = i / inner;
    const int64_t j = outer % period;
    if (inner == 1) {
        const int64_t n = period - j;
        *out = base + j;
        return n < L ? n : L;
    }
    int64_t n = inner - (i - outer * inner);
    n = n < L ? n : L;
    const ACC v = base[j];
    for (int64_t k = 0; k < n; ++k) buf[k] = v;
    *out = buf;
    return n;
}

static void FN(bce_work)(void *vctx, int64_t b, int64_t e, int tid) {
    FN(bce_ctx) *ctx = (FN(bce_ctx) *)vctx;
    const bce_args *a = ctx->a;
    ACC xs[SEG], ts[SEG], ws[SEG], pws[SEG], ones[SEG], ls[SEG], gs[SEG];
    unsigned char keep[SEG];
    for (int k = 0; k < SEG; ++k) ones[k] = 1;
    if (!a->has_ignore) memset(keep, 1, sizeof(keep));
    const int focal = (a->gamma_pos != 0.0 || a->gamma_neg != 0.0)
                          ? ((a->gamma_pos == 2.0 && a->gamma_neg == 2.0) ? 1 : 2)
                          : 0;
    /* integer gammas (0..8) and no smoothing: segments whose targets are all 0 or 1 take the
     * powers by multiplication (FOCAL 3); a segment with a soft target, exp(gamma log) */
    const int int_gammas = focal == 2 && a->eps == 0.0 && a->gamma_pos == (double)(int)a->gamma_pos
                           && a->gamma_neg == (double)(int)a->gamma_neg && a->gamma_pos >= 0.0
                           && a->gamma_pos <= 8.0 && a->gamma_neg >= 0.0 && a->gamma_neg <= 8.0;
    const int clip = a->clip > 0.0;
    const int grad = a->grad != NULL;
    ACC *loss_out = (ACC *)a->loss;
    double total = 0.0;
    for (int64_t i = b; i < e;) {
        int64_t L = e - i < SEG ? e - i : SEG;
        const ACC *wp = ones, *pwp = ones;
        if (a->w) L = FN(weight_run)((const ACC *)a->w, a->w_inner, a->w_period, i, L, ws, &wp);
        if (a->pw) L = FN(weight_run)((const ACC *)a->pw, a->pw_inner, a->pw_period, i, L, pws, &pwp);
        const ACC *xp, *tp;
        if (a->x_dtype == ACC_DT) xp = (const ACC *)a->x + i; else { FN(load)(xs, a->x, a->x_dtype, i, L); xp = xs; }
        if (a->t_dtype == ACC_DT) tp = (const ACC *)a->t + i; else { FN(load)(ts, a->t, a->t_dtype, i, L); tp = ts; }
        if (a->has_ignore) ignore_keep(keep, a->t, a->t_dtype, i, L, a->ignore_value);
        ACC *lp = loss_out ? loss_out + i : ls;
        ACC *gp = grad && a->g_dtype == ACC_DT ? (ACC *)a->grad + i : gs;
#define BCE_CASE(F, Cl, G) FN(bce_seg)(a, (ACC)ctx->scale, L, xp, tp, keep, wp, pwp, lp, gp, F, Cl, G)
        int seg_focal = focal;
        if (int_gammas) {
            ACC soft = 0; /* the count of targets (ignored ones read as 0) neither 0 nor 1 */
            SIMD_SUM(soft)
            for (int64_t k = 0; k < L; ++k) {
                const ACC tk = keep[k] ? tp[k] : (ACC)0;
                soft += (tk == (ACC)0 || tk == (ACC)1) ? (ACC)0 : (ACC)1;
            }
            seg_focal = soft == 0 ? 3 : 2;
        }
        switch (seg_focal * 4 + clip * 2 + grad) {
        case 0: BCE_CASE(0, 0, 0); break;
        case 1: BCE_CASE(0, 0, 1); break;
        case 2: BCE_CASE(0, 1, 0); break;
        case 3: BCE_CASE(0, 1, 1); break;
        case 4: BCE_CASE(1, 0, 0); break;
        case 5: BCE_CASE(1, 0, 1); break;
        case 6: BCE_CASE(1, 1, 0); break;
        case 7: BCE_CASE(1, 1, 1); break;
        case 8: BCE_CASE(2, 0, 0); break;
        case 9: BCE_CASE(2, 0, 1); break;
        case 10: BCE_CASE(2, 1, 0); break;
        case 11: BCE_CASE(2, 1, 1); break;
        case 12: BCE_CASE(3, 0, 0); break;
        case 13: BCE_CASE(3, 0, 1); break;
        case 14: BCE_CASE(3, 1, 0); break;
        default: BCE_CASE(3, 1, 1); break;
        }
#undef BCE_CASE
        if (grad && gp == gs) FN(store)(a->grad, a->g_dtype, i, gs, L);
        if (!loss_out) {
            ACC part = 0;
            SIMD_SUM(part)
            for (int64_t k = 0; k < L; ++k) part += ls[k];
            total += (double)part;
        }
        i += L;
    }
    ctx->partial[tid] = total;
}

CE_API int FN(ce_binary)(bce_args *a) {
    int threads = (int)(a->n / 32768 + 1);
    if (threads > a->n_threads) threads = a->n_threads;
    FN(bce_ctx) ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.a = a;
    ctx.scale = a->scale;
    if (a->mean) {
        /* the mean over unmasked entries; all masked (or empty) gives 0, not 0/0 */
        const double count = a->has_ignore
            ? (double)ce_count_ne(a->t, a->t_dtype, a->n, a->ignore_value, a->n_threads)
            : (double)a->n;
        a->denom = count;
        ctx.scale = count > 0.0 ? a->scale / count : 0.0;
    }
    if (a->n) parallel_for(a->n, threads, FN(bce_work), &ctx);
    double total = 0.0;
    for (int t = 0; t < MAX_THREADS; ++t) total += ctx.partial[t];
    a->total = a->mean ? total * (a->denom > 0.0 ? 1.0 / a->denom : 0.0) : total;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Calibration statistics (crossent.calibration._rows.row_statistics), one row at a time:
 *
 *   pass 1 (the row from memory; float and double rows in place, others converted into the
 *           scratch row): the max m and the row sum (finite iff every entry is; row_max_sum),
 *           for probabilities also the min and sum p^2 (row_moments, or with AVX-512 or AVX2
 *           prob_row_simd, which also takes pass 3); then the first argmax, while the
 *           row is in L1. The next row is prefetched meanwhile (with the intrinsic builds, the
 *           row after it, during a pass over this one in L1: see `spread`).
 *   pass 2 (logits, from L1): e = exp(b (u - m)) into the scratch row, with b the inverse
 *           temperature (`scale`, 1 for the metrics), s = sum e, q = sum e^2 (float partial sums
 *           of SEG terms added in double; exp_row_simd where the CPU has AVX-512). The
 *           confidence is 1 / s (e = 1 at the max), the NLL b (m - u_y) + log s and the Brier
 *           score q / s^2 - 2 e_y / s + 1: no probability is formed. Probabilities: the confidence is m, the NLL -log p_y (p_y clipped at the
 *           smallest normal double) and the Brier score q - 2 p_y + 1.
 *   moments (logits, with dmean; from L1; moment_row_simd with AVX-512): with d = u - m, the
 *           mean D = sum e d / s and then V = sum e (d - D)^2 / s, the variance of the logits
 *           under p = softmax(b u) by the two-pass formula (no cancellation between E[d^2] and
 *           D^2); dmean = D - (u_y - m) = E_p[u] - u_y and dvar = V are the per-row
 *           derivatives of the NLL in b (temperature scaling's Newton step).
 *   pass 3 (classwise, from L1): p_k = e_k (1 / s) in double (p_k itself for probabilities),
 *           every one added to its class's first bin (the column total first[k]). Only entries
 *           above the first edge 1/M can go to another bin, and a row has fewer than M of them:
 *           a test in ACC against a threshold a little below 1/M (it misses none) finds them,
 *           and each whose bin is another moves its exact double p_k from the first bin to it.
 *           The label's count goes to the bin of its own p_y, the same double, so it lands where
 *           its entry did.
 *   per row, with top: the confidence's width bin gets the row's count, confidence and 1 if
 *           the first argmax is the label; the NLL and Brier score add to their sums. With these
 *           sums (what the streaming meter and the width-bin ECE keep) the caller need not read
 *           the per-row outputs back.
 *   validation: a row whose sum is not finite (some entry is NaN or infinite, or a sum of
 *           large finite logits overflowed), or for probabilities whose min, max or sum is out
 *           of bounds, counts as a suspect; the caller looks at the per-row outputs only if
 *           there are any.
 *
 * Thread 0 sums into the outputs (zeroed by the caller), every other thread into its own scratch,
 * added to them in thread order afterwards, so that a call with one thread needs no scratch and
 * no reduction. The classwise sums are bin-major (bin b of class k at b C + k): the entries
 * above 1/M fall mostly in the low bins, whose sums then share a few kilobytes that stay in L1
 * while the rows stream past; class-major, a row's few updates land on random lines of all
 * 2 C M doubles (BENCHMARKS.md: the pass with classwise sums over the pass without, 1.17-1.20x
 * bin-major against 1.20-1.26x class-major). */
typedef struct {
    const cal_args *a;
    double *scratch;    /* per thread: the edges (M + 1) and top (3 M + 2) */
    int64_t per_thread; /* M + 1 + 3 M + 2 */
    double *cw_scratch; /* threads 1, 2, ...: cw_p and cw_y, 2 M C each */
    int64_t suspects[MAX_THREADS];
    int failed[MAX_THREADS];
} FN(cal_ctx);

/* max, min, sum and sum of squares of a row of probabilities, each as two independent vector
 * chains (the two halves of a block interleaved): a single chain would wait on the latency of
 * every add. Float partial sums of SEG terms are added in double. */
ALWAYS_INLINE void FN(row_moments)(const ACC *restrict u, int64_t C, ACC *m_out, ACC *lo_out, double *sum_out,
                                   double *sq_out) {
    ACC m0 = -INFINITY, m1 = -INFINITY, l0 = INFINITY, l1 = INFINITY;
    double sum = 0.0, sq = 0.0;
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        const int64_t n = C - k0 < SEG ? C - k0 : SEG, h = n / 2;
        const ACC *restrict v = u + k0, *restrict w = u + k0 + h;
        ACC s0 = 0, s1 = 0, q0 = 0, q1 = 0;
        CE_PRAGMA(omp simd reduction(max : m0, m1) reduction(min : l0, l1) reduction(+ : s0, s1, q0, q1))
        for (int64_t k = 0; k < h; ++k) {
            const ACC a = v[k], b = w[k];
            m0 = a > m0 ? a : m0;
            m1 = b > m1 ? b : m1;
            l0 = a < l0 ? a : l0;
            l1 = b < l1 ? b : l1;
            s0 += a;
            s1 += b;
            q0 += a * a;
            q1 += b * b;
        }
        if (n & 1) { /* the odd one out, the block's last */
            const ACC b = u[k0 + n - 1];
            m1 = b > m1 ? b : m1;
            l1 = b < l1 ? b : l1;
            s1 += b;
            q1 += b * b;
        }
        sum += (double)s0 + (double)s1;
        sq += (double)q0 + (double)q1;
    }
    *m_out = m0 > m1 ? m0 : m1;
    *lo_out = l0 < l1 ? l0 : l1;
    *sum_out = sum;
    *sq_out = sq;
}

/* The sum and the sum of squares of a row's entries other than its label's, y. The Brier
 * score of a row, sum_k (p_k - [k = y])^2, is q - 2 p_y + 1 from the row's sum of squares q,
 * and the NLL of logits m - z_y + log s; where p_y > 1/2 both cancel (q ~ p_y^2, s ~ e_y) to an
 * absolute error of the float sums' round-off, about 1e-7, which is most of a confident row's
 * score (a Brier of 9e-8 read as 6e-8). From the other entries themselves,
 * sum_{k != y} p_k^2 + (1 - p_y)^2 and log1p(sum_{k != y} e_k / e_y) keep their relative
 * precision; a second read of the row, in L1 by then, for those rows only. */
static void FN(sums_but)(const ACC *v, int64_t C, int64_t y, double *s_out, double *q_out) {
    double s = 0.0, q = 0.0;
    for (int part = 0; part < 2; ++part) {
        const int64_t lo = part ? y + 1 : 0, hi = part ? C : y;
        for (int64_t k0 = lo; k0 < hi; k0 += SEG) {
            const int64_t k1 = hi - k0 < SEG ? hi : k0 + SEG;
            ACC ps = 0, pq = 0;
            SIMD_SUM(ps, pq)
            for (int64_t k = k0; k < k1; ++k) {
                ps += v[k];
                pq += v[k] * v[k];
            }
            s += (double)ps;
            q += (double)pq;
        }
    }
    *s_out = s;
    *q_out = q;
}

/* The classwise pass of one row in portable C (AVX-512 and AVX2 builds use cw_row_simd): every
 * p_k = u_k inv to its column total (its first bin), then the entries above thr, found by blocks
 * of 64, moved from there to their own bins where those are others. */
static void FN(cw_row)(const ACC *u, int64_t C, ACC thr, double inv, double *restrict first, double *restrict cwp,
                       const double *edges, int M) {
    for (int64_t k0 = 0; k0 < C; k0 += 64) {
        const int64_t k1 = C - k0 < 64 ? C : k0 + 64;
        int any = 0;
        CE_PRAGMA(omp simd reduction(| : any))
        for (int64_t k = k0; k < k1; ++k) {
            first[k] += (double)u[k] * inv;
            any |= u[k] > thr;
        }
        if (!any) continue;
        for (int64_t k = k0; k < k1; ++k) {
            if (u[k] > thr) {
                const double pk = (double)u[k] * inv;
                const int b = width_bin(pk, edges, M);
                if (b) {
                    cwp[b * C + k] += pk;
                    first[k] -= pk;
                }
            }
        }
    }
}

WIDE_VECTORS static void FN(cal_work)(void *vctx, int64_t r0, int64_t r1, int tid) {
    FN(cal_ctx) *ctx = (FN(cal_ctx) *)vctx;
    const cal_args *a = ctx->a;
    const int64_t C = a->n_cols;
    const int M = a->n_bins;
    const int logits = a->from_logits, direct = a->x_dtype == ACC_DT;
    /* converted rows live in buf, so the exponentials of a row whose moments are taken (they
     * read the row again) go to a second scratch row */
    const int moments = logits && a->dmean != NULL;
    ACC *buf = (ACC *)malloc((size_t)C * sizeof(ACC) * (moments && !direct ? 2 : 1));
    if (!buf) {
        ctx->failed[tid] = 1;
        return;
    }
    double *cwp = NULL, *cwy = NULL, *edges = NULL, *top = NULL;
    if (M > 0) {
        edges = ctx->scratch + (size_t)tid * (size_t)ctx->per_thread;
        for (int b = 0; b <= M; ++b) edges[b] = (double)b / M;
        if (a->top) top = tid ? edges + M + 1 : a->top;
        if (a->cw_p) {
            cwp = tid ? ctx->cw_scratch + (size_t)(tid - 1) * 2 * (size_t)(C * M) : a->cw_p;
            cwy = tid ? cwp + C * M : a->cw_y;
        }
    }
    double *first = cwp; /* the first bins, bin-major */
    int64_t suspects = 0;
    const size_t es = dtype_size(a->x_dtype);
    ACC *ebuf = moments && !direct ? buf + C : buf;
    const ACC beta = (ACC)a->scale;
    /* a little below 1/M (in p; times s for e): never above any entry that exceeds 1/M */
    const double below = M > 0 ? (1.0 / M) * (1.0 - 1e-5) : 0.0;
    /* With the intrinsic builds, a float row's pass prefetches the row two on into L2: the
     * probabilities' pass (prob_row_simd) a line or two a step, the exponentials of logits the
     * lines of each block of 1,024 entries before it (one burst for a row of 1,000). Measured
     * faster than the burst of the next row into L1 at the start of each row that the other
     * builds use (BENCHMARKS.md: the pass of logits 20-25 % faster without classwise sums, 5-9 %
     * with them, where the classwise pass prefetched a line a step before). Up to 1,024 entries
     * the blocks leave the sums of the pass as one loop adds them. */
    const int spread = HAVE_CW_SIMD && sizeof(ACC) == 4;
    for (int64_t r = r0; r < r1; ++r) {
        const void *xr = (const char *)a->x + (size_t)(r * a->x_row_stride) * es;
        const char *ahead = spread && r + 2 < r1 ? (const char *)a->x + (size_t)((r + 2) * a->x_row_stride) * es : NULL;
        if (!spread && r + 1 < r1) {
            /* the next row, from memory while this one is computed: the hardware prefetcher stops
             * at page boundaries, about every row */
            const char *next = (const char *)a->x + (size_t)((r + 1) * a->x_row_stride) * es;
            for (size_t off = 0; off < (size_t)C * es; off += 64) __builtin_prefetch(next + off, 0, 3);
        }
        const ACC *u = (const ACC *)xr;
        if (!direct) {
            FN(load)(buf, xr, a->x_dtype, 0, C);
            u = buf;
        }
        ACC m, lo = 0;
        double sum, q = 0.0;
        int cw_done = 0;
#if HAVE_CW_SIMD
        if (sizeof(ACC) == 4 && !logits) { /* pass 1 and the classwise pass in one read */
            float mf, lof;
            prob_row_simd((const float *)u, C, (float)below, first, cwp, edges, M, ahead, (int64_t)es, &mf, &lof,
                          &sum, &q);
            m = (ACC)mf;
            lo = (ACC)lof;
            cw_done = 1;
        } else
#endif
        if (logits)
            m = FN(row_max_sum)(u, NULL, C, &sum); /* lo and q are not needed, or come from pass 2 */
        else
            FN(row_moments)(u, C, &m, &lo, &sum, &q);
        const int64_t am = FN(first_equal)(u, C, m);
        const int64_t y = a->y[r];
        const ACC uy = u[y];
        double inv = 1.0, conf, nll, brier;
        const ACC *p = u;
        if (logits) {
            double S = 0.0;
            q = 0.0;
            for (int64_t k0 = 0; k0 < C; k0 += SEG) {
                const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
                ACC ps = 0, pq = 0;
                for (int64_t kb = k0; kb < k1; kb += 1024) { /* ahead's lines of the block, then its entries */
                    const int64_t kc = k1 - kb < 1024 ? k1 : kb + 1024;
                    if (ahead)
                        for (size_t off = (size_t)kb * es; off < (size_t)kc * es; off += 64)
                            __builtin_prefetch(ahead + off, 0, 2);
#if HAVE_EXP_SIMD
                    if (sizeof(ACC) == 4) {
                        float bs, bq;
                        exp_row_simd((const float *)u + kb, (float *)ebuf + kb, kc - kb, (float)m, (float)beta, &bs,
                                     &bq);
                        ps += (ACC)bs;
                        pq += (ACC)bq;
                        continue;
                    }
#endif
                    SIMD_SUM(ps, pq)
                    for (int64_t k = kb; k < kc; ++k) { /* ebuf may be u itself: u[k] is read first */
                        const ACC e = EXP((u[k] - m) * beta);
                        ebuf[k] = e;
                        ps += e;
                        pq += e * e;
                    }
                }
                S += (double)ps;
                q += (double)pq;
            }
            p = ebuf;
            inv = 1.0 / S;
            conf = inv;
            nll = a->scale * ((double)m - (double)uy) + log(S);
            if (moments) {
                double D = 0.0, V = 0.0;
                for (int64_t k0 = 0; k0 < C; k0 += SEG) {
                    const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
                    ACC pd = 0;
#if HAVE_EXP_SIMD
                    if (sizeof(ACC) == 4) {
                        D += (double)moment_row_simd((const float *)u + k0, (const float *)ebuf + k0, k1 - k0,
                                                     (float)m, 0.0f, 0);
                        continue;
                    }
#endif
                    SIMD_SUM(pd)
                    for (int64_t k = k0; k < k1; ++k) { /* e = 0 where u - m overflows to -inf: adds 0 */
                        const ACC e = ebuf[k];
                        pd += e > 0 ? e * (u[k] - m) : (ACC)0;
                    }
                    D += (double)pd;
                }
                D *= inv;
                const ACC Da = (ACC)D;
                for (int64_t k0 = 0; k0 < C; k0 += SEG) {
                    const int64_t k1 = C - k0 < SEG ? C : k0 + SEG;
                    ACC pv = 0;
#if HAVE_EXP_SIMD
                    if (sizeof(ACC) == 4) {
                        V += (double)moment_row_simd((const float *)u + k0, (const float *)ebuf + k0, k1 - k0,
                                                     (float)m, (float)Da, 1);
                        continue;
                    }
#endif
                    SIMD_SUM(pv)
                    for (int64_t k = k0; k < k1; ++k) {
                        const ACC e = ebuf[k], dev = (u[k] - m) - Da;
                        pv += e > 0 ? e * dev * dev : (ACC)0;
                    }
                    V += (double)pv;
                }
                a->dmean[r] = D - ((double)uy - (double)m);
                a->dvar[r] = V * inv;
            }
            const double py = (double)p[y] * inv;
            if (py > 0.5) { /* the label dominates: see FN(sums_but) */
                double s_ex, q_ex;
                FN(sums_but)(p, C, y, &s_ex, &q_ex);
                brier = q_ex * inv * inv + (s_ex * inv) * (s_ex * inv);
                nll = log1p(s_ex / (double)p[y]); /* log(s / e_y), s = e_y + s_ex */
            } else {
                brier = q * inv * inv - 2.0 * py + 1.0;
            }
        } else {
            const double py = (double)uy;
            conf = (double)m;
            nll = -log(py > 2.2250738585072014e-308 ? py : 2.2250738585072014e-308);
            if (py > 0.5) {
                double s_ex, q_ex;
                FN(sums_but)(u, C, y, &s_ex, &q_ex);
                brier = q_ex + (1.0 - py) * (1.0 - py);
            } else {
                brier = q - 2.0 * py + 1.0;
            }
            a->rowmin[r] = (double)lo;
        }
        const int64_t pred = am < 0 ? 0 : am;
        a->conf[r] = conf;
        a->pred[r] = pred;
        a->rowsum[r] = sum;
        if (a->nll) a->nll[r] = nll;
        if (a->brier) a->brier[r] = brier;
        /* the caller's checks (check_rows), on the same doubles. A sum of logits of -inf with a
         * finite max holds masked classes (-inf) and neither NaN nor +inf (either makes the sum
         * NaN or +inf): a valid row, not looked at again. */
        const int masked = logits && sum == -INFINITY && isfinite((double)m);
        suspects += (!isfinite(sum) && !masked) ||
                    (!logits && ((double)lo < a->range_lo || conf > a->range_hi || fabs(sum - 1.0) > a->sum_tol));
        if (top) {
            const int b = width_bin(conf, edges, M);
            top[b] += 1.0;
            top[M + b] += conf;
            top[2 * M + b] += pred == y ? 1.0 : 0.0;
            top[3 * M] += nll;
            top[3 * M + 1] += brier;
        }
        if (cwp && !cw_done) {
            const ACC thr = (ACC)(logits ? below / inv : below);
#if HAVE_CW_SIMD
            if (sizeof(ACC) == 4)
                cw_row_simd((const float *)p, C, (float)thr, inv, first, cwp, edges, M);
            else
#endif
                FN(cw_row)(p, C, thr, inv, first, cwp, edges, M);
        }
        if (cwy) cwy[width_bin((double)p[y] * inv, edges, M) * C + y] += 1.0;
    }
    ctx->suspects[tid] = suspects;
    free(buf);
}

CE_API int FN(ce_calibration)(cal_args *a) {
    const int64_t N = a->n_rows, C = a->n_cols;
    const int M = a->n_bins;
    const int64_t cw = a->cw_p ? 2 * C * M : 0; /* doubles of classwise sums per thread */
    int threads = (int)(N * C / 32768 + 1);
    /* every thread after the first zeroes its own 2 M C classwise sums and adds them to the
     * outputs at the end: one is started only for 8 times as many entries */
    if (cw && N * C < 8 * cw) threads = 1;
    if (threads > a->n_threads) threads = a->n_threads;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > N) threads = (int)(N > 0 ? N : 1);
    FN(cal_ctx) ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.a = a;
    if (M > 0) {
        ctx.per_thread = (M + 1) + 3 * M + 2;
        /* at most 256 MiB of per-thread sums (a vocabulary-sized C): fewer threads beyond */
        while (threads > 1 && (double)(threads - 1) * (double)cw * 8.0 > 268435456.0) --threads;
        ctx.scratch = (double *)calloc((size_t)threads * (size_t)ctx.per_thread + (size_t)(threads - 1) * (size_t)cw,
                                       sizeof(double));
        if (!ctx.scratch) return 1;
        ctx.cw_scratch = ctx.scratch + (size_t)threads * (size_t)ctx.per_thread;
    }
    if (N) parallel_for(N, threads, FN(cal_work), &ctx);
    int status = 0;
    a->suspects = 0;
    for (int t = 0; t < MAX_THREADS; ++t) {
        status |= ctx.failed[t];
        a->suspects += ctx.suspects[t];
    }
    if (M > 0) {
        for (int t = 1; t < threads; ++t) { /* thread 0 summed into the outputs */
            const double *top = ctx.scratch + (size_t)t * (size_t)ctx.per_thread + M + 1;
            if (a->top)
                for (int i = 0; i < 3 * M + 2; ++i) a->top[i] += top[i];
            const double *cwp = ctx.cw_scratch + (size_t)(t - 1) * (size_t)cw;
            if (cw)
                for (int64_t i = 0; i < C * M; ++i) {
                    a->cw_p[i] += cwp[i];
                    a->cw_y[i] += cwp[C * M + i];
                }
        }
        free(ctx.scratch);
    }
    return status;
}

#undef FN
#undef TINY
#undef LOG_MIN
#undef ALWAYS_INLINE
