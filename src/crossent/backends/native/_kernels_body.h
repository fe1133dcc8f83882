/* The kernels of _kernels.c, written once for an accumulation type ACC (float or double).
 * Included by _kernels.c with ACC, ACC_DT, SFX, EXP, LOG and TANH defined. */

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
 *   pass 1 (the one read from memory): m = max u, and the row sums the loss needs
 *          (sum_k w_k u_k for smoothing; sum a_k, sum a_k u_k for probability targets);
 *   pass 2 (from L2): S = sum exp(u - m), so lse = m + log S;
 *   per-row scalars in double: the loss and the coefficients of
 *          G = q (rowc + cpc u - pc t~) + rowconst + ow w - a - sparse onehot_y
 *   pass 3 (from L2): G written once, then the target entry replaced by its exact value.
 * The formulas are those of crossent/backends/torch_ops/softmax.py (see its docstring and
 * crossent.cross_entropy); focal rows take gamma from `gamma` or `gamma_rows`. */

typedef struct {
    const sm_args *a;
    ACC *scratch;     /* per thread: (u row, g row) */
    int64_t per_thread;
    double scale;     /* the gradient's multiplier */
    int64_t tile;     /* positions per tile of (N, C, S) logits */
    double partial[MAX_THREADS]; /* per-thread sums of the row losses */
} FN(sm_ctx);

/* The per-row coefficients of the formulation for class-index targets, from the row's
 * statistics: the C form of crossent/_formula.py (target_terms and regulariser_terms), written
 * once and instantiated for the two precisions that call it: double in sm_row (libm's pow) and
 * ACC in sm_work_columns (vectorised across positions, exp/log polynomials).
 *
 * Inputs: s the sample weight (w_y, 0 when ignored), valid (1, or 0 when ignored), lse,
 * ell = lse - u_y = -log q_y, omq = 1 - q_y and qy = q_y (each computed without cancellation by
 * the caller), su = sum_k w_k u_k (smoothing), gam the focusing parameter, keep = 1 - eps,
 * uni = eps / C, wsum = sum_k w_k, zl the z-loss weight, p1 the Poly-1 weight; has_w whether
 * class weights are given. Outputs: the row's loss and the coefficients of
 *   G = q rowc + rowconst + ow w - sparse onehot_y   (times the reduction's scale)
 * - target part a_y (1-q_y)^gamma ell_y, a_y = (1-eps) s; its gradient is a_y f kappa (q -
 *   onehot_y) with f = (1-q_y)^gamma and kappa = 1 + gamma q_y ell / (1 - q_y): the finite
 *   ratio ell / (1 - q_y) -> 1 replaces (1-q)^(gamma-1), which overflows for gamma < 1;
 * - smoothing's uniform part (eps/C) sum_k w_k ell_k = (eps/C)(lse sum(w) - sum w u), gradient
 *   (eps/C)(q sum(w) - w);
 * - z-loss (PaLM) s lambda lse^2, gradient 2 s lambda lse q;
 * - Poly-1 (Leng et al. 2022) s eps1 (1 - P), P = (1-eps) q_y + eps/C. */
#define CE_INDEX_COEFFICIENTS(NAME, T, POW)                                                       \
    ALWAYS_INLINE void NAME(T s, T valid, T lse, T ell, T omq, T qy, T su, T gam, T keep, T uni,  \
                            T wsum, T zl, T p1, int has_w, T *loss, T *rowc, T *sparse,           \
                            T *rowconst, T *ow) {                                                 \
        const T a_y = s * keep;                                                                   \
        T l, c;                                                                                   \
        if (gam != 0) {                                                                           \
            const T factor = POW(omq, gam); /* omq = 0: 0 (1 for gamma = 0, never reached) */     \
            const T ratio = omq > 0 ? ell / omq : (T)1;                                           \
            l = a_y * factor * ell;                                                               \
            c = a_y * factor * ((T)1 + gam * qy * ratio);                                         \
        } else {                                                                                  \
            l = a_y * ell;                                                                        \
            c = a_y;                                                                              \
        }                                                                                         \
        T sp = c, rc = 0, o = 0;                                                                  \
        if (uni != 0) {                                                                           \
            const T ue = uni * valid;                                                             \
            l += ue * (lse * wsum - su);                                                          \
            c += ue * wsum;                                                                       \
            if (has_w) o = -ue; else rc = -ue;                                                    \
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

#define CE_POW_D(b, e) pow(b, e)
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

/* One row r: x row `xr` (dtype x_dtype, contiguous), gradient row `gr` (g_dtype) or NULL,
 * probability-target row `tr` or NULL; `ubuf`, `gbuf` are this thread's scratch rows. Writes
 * the row's loss (and -log q_y) and returns the loss as stored. */
static double FN(sm_row)(const FN(sm_ctx) *ctx, int64_t r, const void *xr, int x_dtype, char *gr, int g_dtype,
                         const ACC *tr, ACC *ubuf, ACC *gbuf) {
    const sm_args *a = ctx->a;
    const int64_t C = a->n_cols;
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
    /* half precision without softcap: the conversion and the max in one read */
    const int load_max = need_u && !cap && !(index && eps != 0.0);
    ACC m_loaded = -INFINITY;
    if (load_max) {
        m_loaded = FN(load_max)(ubuf, xr, x_dtype, C);
        u = ubuf;
    } else if (need_u) {
        FN(load)(ubuf, xr, x_dtype, 0, C);
        if (cap) {
            const ACC c = (ACC)a->softcap, ic = (ACC)(1.0 / a->softcap);
            for (int64_t k = 0; k < C; ++k) ubuf[k] = c * TANH(ubuf[k] * ic);
        }
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
    if (index && eps != 0.0) {
        m = FN(row_max_sum)(u, w, C, &su); /* and sum_k w_k u_k, in the same read */
    } else {
        m = load_max ? m_loaded : FN(row_max)(u, C);
    }
    if (!index) {
        for (int64_t k0 = 0; k0 < C; k0 += SEG) {
            int64_t n = C - k0 < SEG ? C - k0 : SEG;
            ACC pa = 0, pau = 0;
            SIMD_SUM(pa, pau)
            for (int64_t k = k0; k < k0 + n; ++k) {
                ACC ak = (tr[k] * keep + uni) * (w ? w[k] : (ACC)1);
                pa += ak;
                pau += ak != 0 ? ak * u[k] : (ACC)0; /* no target mass: nothing, even at u = -inf */
            }
            sa += (double)pa;
            sau += (double)pau;
        }
    }

    /* pass 2: S = sum exp(u - m) in float partial sums of SEG terms, added in double */
    /* In the common case pass 2 keeps e = exp(u - m) in the gradient row (in cache) and
     * pass 3 only rescales it. Not when a later pass still reads u, which g may alias. */
    const int keep_e = gr != NULL && index && !cap && a->conf == 0.0;
    const ACC u_y_acc = index ? u[y] : (ACC)0; /* read before g, which may alias u, is written */
    double S = 0.0, Seu = 0.0, Set = 0.0;
    for (int64_t k0 = 0; k0 < C; k0 += SEG) {
        int64_t n = C - k0 < SEG ? C - k0 : SEG;
        ACC ps = 0;
        if (keep_e) {
            SIMD_SUM(ps)
            for (int64_t k = k0; k < k0 + n; ++k) {
                const ACC e = EXP(u[k] - m);
                g[k] = e;
                ps += e;
            }
        } else {
            SIMD_SUM(ps)
            for (int64_t k = k0; k < k0 + n; ++k) ps += EXP(u[k] - m);
        }
        S += (double)ps;
        if (a->conf != 0.0) { /* sum e u, for the entropy H = lse - sum q u */
            ACC pe = 0;
            SIMD_SUM(pe)
            for (int64_t k = k0; k < k0 + n; ++k) {
                const ACC e = EXP(u[k] - m);
                pe += e != 0 ? e * u[k] : (ACC)0; /* 0 log 0 = 0: a masked class (u = -inf) adds 0 */
            }
            Seu += (double)pe;
        }
        if (!index && a->poly1 != 0.0) { /* sum e t~, for P = sum q t~ */
            ACC pe = 0;
            SIMD_SUM(pe)
            for (int64_t k = k0; k < k0 + n; ++k) pe += EXP(u[k] - m) * (tr[k] * keep + uni);
            Set += (double)pe;
        }
    }
    const double lse = (double)m + log(S);

    /* per-row scalars (double) */
    double loss, rowc, sparse = 0.0, rowconst = 0.0, ow = 0.0, cpc = 0.0, pc = 0.0;
    double ell_y = 0.0, u_y = 0.0;
    if (index) {
        u_y = (double)u_y_acc;
        ell_y = lse - u_y; /* -log q_y, exact even where q_y underflows */
        const double gam = a->gamma_rows ? (double)((const ACC *)a->gamma_rows)[r] : a->gamma;
        FN(coef_d)(s, 1.0, lse, ell_y, -expm1(-ell_y), exp(-ell_y), su, gam, 1.0 - eps,
                   eps / (double)C, a->w_sum, a->z_loss, a->poly1, w != NULL,
                   &loss, &rowc, &sparse, &rowconst, &ow);
    } else {
        /* dense target mass a = t~ w: L = lse sum(a) - sum a u; G = q sum(a) - a */
        loss = sa * lse - sau;
        rowc = sa;
        if (a->z_loss != 0.0) { /* z-loss (PaLM): lambda lse^2, d/du = 2 lambda lse q */
            loss += a->z_loss * lse * lse;
            rowc += 2.0 * a->z_loss * lse;
        }
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

    /* pass 3: G = scale (q (rowc + cpc u - pc t~) + rowconst + ow w - a), q = e^(u-m) / S.
     * u - m (not u - lse): m is one of the row's values, so the difference is exact
     * where it matters, even at logits of 1e4 */
    const ACC A = (ACC)(rowc * sc / S), B = (ACC)(rowconst * sc);
    const ACC Cp = (ACC)(cpc * sc / S), Pc = (ACC)(pc * sc / S), Ow = (ACC)(ow * sc), Ad = (ACC)sc;
    /* half-precision gradient of the common case: scaled and rounded in one loop */
    const int fused_store = keep_e && need_g && !(w && Ow != 0);
    if (fused_store) {
        FN(store_affine)(gr, g_dtype, g, A, B, C);
    } else if (keep_e) {
        for (int64_t k = 0; k < C; ++k) g[k] = g[k] * A + B;
    } else if (Cp == 0) {
        for (int64_t k = 0; k < C; ++k) g[k] = EXP(u[k] - m) * A + B;
    } else {
        for (int64_t k = 0; k < C; ++k) {
            const ACC e = EXP(u[k] - m);
            g[k] = (e != 0 ? e * (A + Cp * u[k]) : (ACC)0) + B; /* q u -> 0 where q = 0, u = -inf */
        }
    }
    /* the rarer terms, each one more pass over the row in cache */
    if (w && Ow != 0 && !fused_store)
        for (int64_t k = 0; k < C; ++k) g[k] += Ow * w[k];
    if (tr) {
        if (Pc != 0)
            for (int64_t k = 0; k < C; ++k) g[k] -= EXP(u[k] - m) * Pc * (tr[k] * keep + uni);
        if (w)
            for (int64_t k = 0; k < C; ++k) g[k] -= Ad * (tr[k] * keep + uni) * w[k];
        else
            for (int64_t k = 0; k < C; ++k) g[k] -= Ad * (tr[k] * keep + uni);
    }
    if (cap) {
        const ACC ic = (ACC)(1.0 / a->softcap);
        for (int64_t k = 0; k < C; ++k) {
            const ACC th = u[k] * ic; /* d/dx [c tanh(x/c)] = 1 - tanh^2 */
            g[k] *= (ACC)1 - th * th;
        }
    }
    if (index) {
        /* the target entry: rowc q_y - sparse = rowc expm1(-ell_y) + (rowc - sparse), in
         * double, so 1 - q_y stays exact where q_y -> 1 */
        const double qy = exp(-ell_y);
        double v = rowc * expm1(-ell_y) + (rowc - sparse) + rowconst + cpc * qy * u_y;
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
    const int64_t C = a->n_cols;
    ACC *ubuf = ctx->scratch + (int64_t)tid * ctx->per_thread;
    ACC *gbuf = ubuf + C;
    const size_t xsz = dtype_size(a->x_dtype), gsz = dtype_size(a->g_dtype);
    double total = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
        const char *xr = (const char *)a->x + (size_t)(r * a->x_row_stride) * xsz;
        char *gr = a->grad ? (char *)a->grad + (size_t)(r * a->g_row_stride) * gsz : NULL;
        const ACC *tr = a->t ? (const ACC *)a->t + r * a->t_row_stride : NULL;
        total += FN(sm_row)(ctx, r, xr, a->x_dtype, gr, a->g_dtype, tr, ubuf, gbuf);
    }
    ctx->partial[tid] = total;
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
    ACC *ubuf = ctx->scratch + (int64_t)tid * ctx->per_thread;
    ACC *gbuf = ubuf + C;
    ACC *xt = gbuf + C;   /* (B, C) logits, row-major */
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
                                ACC_DT, NULL, ubuf, gbuf);
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
 * smoothing, a fixed focal gamma (without smoothing), z-loss and Poly-1; the same formulas as
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
    int64_t *yv = (int64_t *)(gout + B);
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
            Ssum[j] = Sn[j] = su[j] = uy[j] = 0;
        }
        /* pass 1: max, sum_c w_c u_c, u_y */
        for (int64_t c = 0; c < C; ++c) {
            const ACC *xc = (const ACC *)a->x + base + c * S;
            if (a->x_dtype != ACC_DT) {
                FN(load)(tmp, a->x, a->x_dtype, base + c * S, nb);
                xc = tmp;
            }
            const ACC wc = w ? w[c] : (ACC)1;
            for (int64_t j = 0; j < nb; ++j) {
                const ACC v = xc[j];
                m[j] = v > m[j] ? v : m[j];
                su[j] += wc * v;
                uy[j] = c == yv[j] ? v : uy[j];
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
            FN(coef_a)(s, valid, lse, ell, omq, qy, su[j], gam, keep, uni, wsum, zl, p1, w != NULL,
                       &loss, &rowc, &sparse, &rowconst, &ow);
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
                        && !(a->gamma != 0.0 && a->eps != 0.0);
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
    ctx.per_thread = columns ? (C + 16) * ctx.tile : 2 * C + (spatial ? 2 * ctx.tile * C : 0);
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
    for (int t = 0; t < MAX_THREADS; ++t) total += ctx.partial[t];
    a->total = a->mean ? (a->denom > 0.0 ? total / a->denom : 0.0) : total;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Sigmoid family: elementwise, in segments of at most SEG elements.
 *
 * Per element, with p = sigmoid(x), the (smoothed) target t, pos_weight pw, weight w:
 *   b = pw t (-log p) + (1 - t)(-log(1 - p_m)),  p_m = max(p - clip, 0)
 *   L = w alpha_t (1 - p_t)^gamma_t b,           1 - p_t = t (1 - p) + (1 - t) p_m
 * and its gradient, as derived in crossent/backends/torch_ops/binary.py. One exp and one log per element:
 * e = exp(-|x|) gives p, 1 - p (never as 1 - p, which rounds to 0 for x > 17 in fp32) and
 * log(1 + e), from which -log p = max(-x, 0) + log1p(e) and -log(1 - p) = max(x, 0) + log1p(e). */

typedef struct {
    const bce_args *a;
    double scale;
    double partial[MAX_THREADS];
} FN(bce_ctx);

ALWAYS_INLINE ACC FN(log1p_small)(ACC v) {
    /* log1p(v) for v in [-1, 1] from log: with w = fl(1 + v), log(w) - ((w - 1) - v) / w
     * corrects the rounding of 1 + v (Goldberg's trick); for |v| below the epsilon w = 1 and
     * the result is v itself */
    const ACC w = (ACC)1 + v;
    return LOG(w) - ((w - (ACC)1) - v) / w;
}

ALWAYS_INLINE void FN(bce_seg)(const bce_args *a, const ACC sc, int64_t L, const ACC *restrict xp, const ACC *restrict tp,
                               const unsigned char *restrict kp, const ACC *restrict wp,
                               const ACC *restrict pwp, ACC *restrict lp,
                               ACC *restrict gp, const int FOCAL, const int CLIP, const int GRAD) {
    /* FOCAL: 0 none, 1 gamma_pos = gamma_neg = 2 (a square), 2 general (exp(gamma log)) */
    const ACC keep = (ACC)(1.0 - a->eps), half = (ACC)(a->eps / 2.0);
    const ACC gpos = (ACC)a->gamma_pos, gneg = (ACC)a->gamma_neg, c = (ACC)a->clip;
    /* alpha_t = alpha t + (1 - alpha)(1 - t) = a0 + a1 t; 1 when alpha is off */
    const ACC a0 = a->alpha >= 0 ? (ACC)(1.0 - a->alpha) : (ACC)1;
    const ACC a1 = a->alpha >= 0 ? (ACC)(2.0 * a->alpha - 1.0) : (ACC)0;
    /* kp: 1 where the element counts, 0 where its target is ignore_index (see ignore_keep) */
    for (int64_t k = 0; k < L; ++k) {
        const ACC x = xp[k], t0 = tp[k];
        const int valid = kp[k] != 0;
        const ACC t = (valid ? t0 : (ACC)0) * keep + half; /* towards 1/2: t (1 - eps) + eps/2 */
        const ACC ax = x < 0 ? -x : x;
        const ACC e = EXP(-ax);
        const ACC w1 = (ACC)1 + e;
        const ACC r = (ACC)1 / w1;
        const ACC l1 = LOG(w1) - ((w1 - (ACC)1) - e) * r; /* log1p(e), as in log1p_small */
        const ACC er = e * r;
        const ACC p = x >= 0 ? r : er;
        const ACC q = x >= 0 ? er : r; /* 1 - p */
        const ACC ellp = (x < 0 ? -x : (ACC)0) + l1; /* -log p = softplus(-x) */
        ACC elln = (x > 0 ? x : (ACC)0) + l1;        /* -log(1 - p) = softplus(x) */
        ACC pm = p;
        if (CLIP) {
            pm = p - c;
            pm = pm > 0 ? pm : (ACC)0; /* the shifted probability of the asymmetric loss */
            elln = -FN(log1p_small)(-pm);
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
            } else {
                /* (1 - p_t)^gamma_t = exp(gamma_t log(1 - p_t)); a gamma_t of 0 gives exactly 1
                 * (0 * log 0 would be NaN) */
                factor = gt == 0 ? (ACC)1 : EXP(gt * LOG(denom));
            }
        }
        lp[k] = valid ? mult * factor * b : (ACC)0;
        if (GRAD) {
            const ACC s = p * q; /* dp/dx */
            ACC db;
            if (CLIP) {
                /* d[-log(1 - p_m)]/dx = m s / (1 - p_m), 1 - p_m = (1 - p) + clip where p > clip */
                const ACC dn = pm > 0 ? s / (q + c) : (ACC)0;
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
        switch (focal * 4 + clip * 2 + grad) {
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
        default: BCE_CASE(2, 1, 1); break;
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

#undef FN
#undef TINY
#undef ALWAYS_INLINE
