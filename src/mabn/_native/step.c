/*
 * The fused CPU step of mabn's normalization layers: one call per direction.
 *
 * Forward: the statistics of each normalization group, every statistic of the call from the
 * coefficient matrix the caller selected (the same tables as the composed path, mabn/_stream.py),
 * r and d, the normalization, and the buffer writes when everything is finite. Backward: the
 * per-group sums of dL/dy and dL/dy * x_hat, g and Psi (or their moving averages over the backward
 * window, which it advances), dL/dx and the affine gradients.
 *
 * Layouts: x is (N, C, S) contiguous, or (N, S, C) for channels_last. Statistics are accumulated
 * in double and rounded to the statistics dtype, as the composed path keeps them. Built once per
 * machine by mabn/_native/__init__.py; every function is compiled for float and for double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t n, c, s, groups;         /* x as (n, c, s), or (n, s, c) when channels_last */
    int64_t channels_last, centered, renorm;
    int64_t m;                       /* forward window entries (0: batch statistics) */
    int64_t rows_in, rows_out;       /* the forward coefficient matrix */
    int64_t var, den, bounds, mean, shift, target, running;  /* its output rows; -1: absent */
    int64_t bm;                      /* backward window entries (0: batch statistics) */
    double d_max;
} Spec;

enum { USED_VAR = 0, USED_MEAN = 1, USED_R = 2, USED_D = 3 };

static double lerp(double a, double b, double w) {
    /* torch.lerp's formula, exact at both ends */
    return w < 0.5 ? a + w * (b - a) : b - (b - a) * (1.0 - w);
}

static double clamp(double v, double lo, double hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

#define DEFINE_STEP(T, SUFFIX)                                                                        \
                                                                                                      \
/* stats[(g * k + s) * c + ch]: (mean, variance) or (E[x^2],) of each group, rounded to T */           \
static void statistics_##SUFFIX(const Spec* sp, const T* x, double* stats) {                         \
    const int64_t C = sp->c, S = sp->s, G = sp->groups, B = sp->n / G, k = sp->centered ? 2 : 1;      \
    const double count = (double)(B * S);                                                             \
    if (!sp->channels_last) {                                                                         \
        for (int64_t g = 0; g < G; g++)                                                               \
            for (int64_t ch = 0; ch < C; ch++) {                                                      \
                double mean = 0.0, acc = 0.0;                                                         \
                if (sp->centered) {                                                                   \
                    for (int64_t b = 0; b < B; b++) {                                                 \
                        const T* p = x + ((g * B + b) * C + ch) * S;                                  \
                        double part = 0.0;                                                            \
                        _Pragma("omp simd reduction(+:part)")                                          \
                        for (int64_t i = 0; i < S; i++) part += (double)p[i];                         \
                        mean += part;                                                                 \
                    }                                                                                 \
                    mean /= count;                                                                    \
                }                                                                                     \
                for (int64_t b = 0; b < B; b++) {                                                     \
                    const T* p = x + ((g * B + b) * C + ch) * S;                                      \
                    double part = 0.0;                                                                \
                    _Pragma("omp simd reduction(+:part)")                                              \
                    for (int64_t i = 0; i < S; i++) {                                                 \
                        const double v = (double)p[i] - mean;                                         \
                        part += v * v;                                                                \
                    }                                                                                 \
                    acc += part;                                                                      \
                }                                                                                     \
                if (sp->centered) {                                                                   \
                    stats[(g * k) * C + ch] = (double)(T)mean;                                        \
                    stats[(g * k + 1) * C + ch] = (double)(T)(acc / count);                           \
                } else {                                                                              \
                    stats[g * C + ch] = (double)(T)(acc / count);                                     \
                }                                                                                     \
            }                                                                                         \
        return;                                                                                       \
    }                                                                                                 \
    double* mean = calloc((size_t)C, sizeof(double));                                                 \
    double* acc = calloc((size_t)C, sizeof(double));                                                  \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        const T* base = x + g * B * S * C;                                                            \
        memset(mean, 0, (size_t)C * sizeof(double));                                                  \
        memset(acc, 0, (size_t)C * sizeof(double));                                                   \
        if (sp->centered) {                                                                           \
            for (int64_t p = 0; p < B * S; p++) {                                                     \
                const T* row = base + p * C;                                                          \
                _Pragma("omp simd")                                                                   \
                for (int64_t ch = 0; ch < C; ch++) mean[ch] += (double)row[ch];                       \
            }                                                                                         \
            for (int64_t ch = 0; ch < C; ch++) mean[ch] /= count;                                     \
        }                                                                                             \
        for (int64_t p = 0; p < B * S; p++) {                                                         \
            const T* row = base + p * C;                                                              \
            _Pragma("omp simd")                                                                       \
            for (int64_t ch = 0; ch < C; ch++) {                                                      \
                const double v = (double)row[ch] - mean[ch];                                          \
                acc[ch] += v * v;                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int64_t ch = 0; ch < C; ch++) {                                                          \
            if (sp->centered) {                                                                       \
                stats[(g * k) * C + ch] = (double)(T)mean[ch];                                        \
                stats[(g * k + 1) * C + ch] = (double)(T)(acc[ch] / count);                           \
            } else {                                                                                  \
                stats[g * C + ch] = (double)(T)(acc[ch] / count);                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    free(mean);                                                                                       \
    free(acc);                                                                                        \
}                                                                                                     \
                                                                                                      \
/* y = scale * x + shift per (group, channel) */                                                      \
static void affine_##SUFFIX(const Spec* sp, const T* x, T* y, const T* scale, const T* shift) {      \
    const int64_t C = sp->c, S = sp->s, G = sp->groups, B = sp->n / G;                                \
    for (int64_t n = 0; n < sp->n; n++) {                                                             \
        const T* a = scale + (n / B) * C;                                                             \
        const T* b = shift + (n / B) * C;                                                             \
        if (!sp->channels_last) {                                                                     \
            for (int64_t ch = 0; ch < C; ch++) {                                                      \
                const T* p = x + (n * C + ch) * S;                                                    \
                T* q = y + (n * C + ch) * S;                                                          \
                const T av = a[ch], bv = b[ch];                                                       \
                _Pragma("omp simd")                                                                   \
                for (int64_t i = 0; i < S; i++) q[i] = av * p[i] + bv;                                \
            }                                                                                         \
        } else {                                                                                      \
            for (int64_t i = 0; i < S; i++) {                                                         \
                const T* p = x + (n * S + i) * C;                                                     \
                T* q = y + (n * S + i) * C;                                                           \
                _Pragma("omp simd")                                                                   \
                for (int64_t ch = 0; ch < C; ch++) q[ch] = a[ch] * p[ch] + b[ch];                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* scale = gamma * r / sqrt(var_eps), shift = beta + gamma * d - scale * mean, per (group, channel) */ \
static void coefficients_##SUFFIX(const Spec* sp, const T* used, const T* weight, const T* bias,     \
                                  T* scale, T* shift) {                                               \
    const int64_t C = sp->c, GC = sp->groups * sp->c;                                                 \
    for (int64_t i = 0; i < GC; i++) {                                                                \
        const int64_t ch = i % C;                                                                     \
        const double gamma = weight ? (double)weight[ch] : 1.0;                                       \
        const double a = gamma * (double)used[USED_R * GC + i] / sqrt((double)used[USED_VAR * GC + i]); \
        const double d = gamma * (double)used[USED_D * GC + i];                                       \
        scale[i] = (T)a;                                                                              \
        shift[i] = (T)((bias ? (double)bias[ch] : 0.0) + d - a * (double)used[USED_MEAN * GC + i]);   \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* The normalization with the statistics of a call (used: (4, G, C)); the replay of a recomputation */ \
void mabn_normalize_##SUFFIX(const Spec* sp, const T* x, T* y, const T* used, const T* weight,       \
                             const T* bias) {                                                         \
    const int64_t GC = sp->groups * sp->c;                                                            \
    T* scale = malloc((size_t)(2 * GC) * sizeof(T));                                                  \
    coefficients_##SUFFIX(sp, used, weight, bias, scale, scale + GC);                                 \
    affine_##SUFFIX(sp, x, y, scale, scale + GC);                                                     \
    free(scale);                                                                                      \
}                                                                                                     \
                                                                                                      \
/* out[r] = sum_j A[r, j] * rows[j] for rows (rows_in, C) and A (rows_out, rows_in), rounded to T */  \
static void product_##SUFFIX(const T* A, const double* rows, int64_t rows_out, int64_t rows_in,       \
                             int64_t C, double* out) {                                                \
    for (int64_t r = 0; r < rows_out; r++) {                                                          \
        double* o = out + r * C;                                                                      \
        memset(o, 0, (size_t)C * sizeof(double));                                                     \
        for (int64_t j = 0; j < rows_in; j++) {                                                       \
            const double a = (double)A[r * rows_in + j];                                              \
            if (a == 0.0) continue;                                                                   \
            const double* v = rows + j * C;                                                           \
            _Pragma("omp simd")                                                                       \
            for (int64_t ch = 0; ch < C; ch++) o[ch] += a * v[ch];                                    \
        }                                                                                             \
        for (int64_t ch = 0; ch < C; ch++) o[ch] = (double)(T)o[ch];                                  \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
static int all_finite_##SUFFIX(const double* v, int64_t count) {                                      \
    int ok = 1;                                                                                       \
    for (int64_t i = 0; i < count; i++) ok &= isfinite(v[i]) != 0;                                   \
    return ok;                                                                                        \
}                                                                                                     \
                                                                                                      \
/* The statistics of each group as the caller keeps them ((G, k, C) in T), to reduce over processes */ \
void mabn_statistics_##SUFFIX(const Spec* sp, const T* x, T* out) {                                  \
    const int64_t count = sp->groups * (sp->centered ? 2 : 1) * sp->c;                               \
    double* stats = malloc((size_t)count * sizeof(double));                                           \
    statistics_##SUFFIX(sp, x, stats);                                                                \
    for (int64_t i = 0; i < count; i++) out[i] = (T)stats[i];                                         \
    free(stats);                                                                                      \
}                                                                                                     \
                                                                                                      \
/*                                                                                                    \
 * One training forward. Rows of the product: the window (m * k), the call's groups (G * k), the      \
 * running statistics (k) and a row of ones; ``stats`` (the groups' statistics, (G, k, C)) is NULL    \
 * unless they come from elsewhere (reduced over processes). With gradient accumulation (``accum``,   \
 * rows: the k target sums, the finite forward calls, the finite backward calls) the running          \
 * statistics move at the step's last call (``last``) by the mean of its finite calls' targets.       \
 * Returns 1 when the call's statistics are finite (its window entries are pushed), else 0 (y and     \
 * used are NaN).                                                                                     \
 */                                                                                                   \
int64_t mabn_forward_##SUFFIX(const Spec* sp, const T* x, T* y, const T* stats, const T* A, T* window,\
                              T* running_mean, T* running_var, const T* weight, const T* bias,        \
                              T* used, int64_t* num_batches_tracked, int64_t* forward_steps,          \
                              T* accum, int64_t* accum_calls, int64_t period, int64_t last,           \
                              double ema_weight, double unbias) {                                     \
    const int64_t C = sp->c, G = sp->groups, k = sp->centered ? 2 : 1, m = sp->m, GC = G * C;         \
    const int64_t rows_in = sp->rows_in, rows_out = sp->rows_out;                                     \
    double* rows = malloc((size_t)((rows_in + rows_out + k + 1) * C) * sizeof(double));               \
    double* out = rows + rows_in * C;                                                                 \
    double* pending = out + rows_out * C; /* accumulation: the step's sums with this call */          \
    for (int64_t i = 0; i < m * k * C; i++) rows[i] = (double)window[i];                              \
    if (stats) {                                                                                      \
        for (int64_t i = 0; i < G * k * C; i++) rows[m * k * C + i] = (double)stats[i];               \
    } else {                                                                                          \
        statistics_##SUFFIX(sp, x, rows + m * k * C);                                                 \
    }                                                                                                 \
    double* running = rows + (m + G) * k * C;                                                         \
    for (int64_t ch = 0; ch < C; ch++) {                                                              \
        if (sp->centered) {                                                                           \
            running[ch] = (double)running_mean[ch];                                                   \
            running[C + ch] = (double)running_var[ch];                                                \
        } else {                                                                                      \
            running[ch] = (double)running_var[ch];                                                    \
        }                                                                                             \
        running[k * C + ch] = 1.0;                                                                    \
    }                                                                                                 \
    product_##SUFFIX(A, rows, rows_out, rows_in, C, out);                                             \
    double* target = out + sp->target * C;                                                            \
    double* next = out + sp->running * C;                                                             \
    if (sp->centered)                                                                                 \
        for (int64_t ch = 0; ch < C; ch++) target[C + ch] = (double)(T)(target[C + ch] * unbias);     \
    int ok, stored;                                                                                   \
    if (accum) {                                                                                      \
        ok = all_finite_##SUFFIX(out, sp->running * C);                                               \
        for (int64_t i = 0; i < (k + 1) * C; i++) {                                                   \
            const double entry = i < k * C ? target[i] : 1.0;                                         \
            pending[i] = (double)(T)((double)accum[i] + (ok ? entry : 0.0));                          \
        }                                                                                             \
        for (int64_t i = 0; i < k * C; i++) {                                                         \
            const double count = pending[k * C + i % C] < 1.0 ? 1.0 : pending[k * C + i % C];         \
            next[i] = (double)(T)lerp(running[i], (double)(T)(pending[i] / count), ema_weight);       \
        }                                                                                             \
        stored = last && pending[k * C] > 0.0 && all_finite_##SUFFIX(next, k * C);                    \
    } else {                                                                                          \
        for (int64_t i = 0; i < k * C; i++) next[i] = (double)(T)lerp(running[i], target[i], ema_weight); \
        ok = stored = all_finite_##SUFFIX(out, rows_out * C);                                         \
    }                                                                                                 \
    for (int64_t i = 0; i < GC; i++) {                                                                \
        const int64_t g = i / C, ch = i % C;                                                          \
        const double var = out[(sp->var + g) * C + ch];                                               \
        double r = 1.0, d = 0.0;                                                                      \
        if (sp->renorm) {                                                                             \
            const double den = out[(sp->den + g) * C + ch];                                           \
            const double lo = out[sp->bounds * C + ch], hi = out[(sp->bounds + 1) * C + ch];          \
            r = sqrt((double)(T)clamp((double)(T)(var / den), lo, hi));                               \
            if (sp->centered)                                                                         \
                d = clamp((double)(T)(out[(sp->shift + g) * C + ch] / sqrt(den)), -sp->d_max, sp->d_max); \
        }                                                                                             \
        used[USED_VAR * GC + i] = (T)(ok ? var : NAN);                                                \
        used[USED_MEAN * GC + i] = (T)(ok ? (sp->centered ? out[(sp->mean + g) * C + ch] : 0.0) : NAN); \
        used[USED_R * GC + i] = (T)(ok ? r : NAN);                                                    \
        used[USED_D * GC + i] = (T)(ok ? d : NAN);                                                    \
    }                                                                                                 \
    mabn_normalize_##SUFFIX(sp, x, y, used, weight, bias);                                            \
    if (ok) {                                                                                         \
        for (int64_t i = 0; i < m * k * C; i++) window[i] = (T)rows[G * k * C + i];                   \
        if (forward_steps) *forward_steps += G;                                                       \
    }                                                                                                 \
    if (stored) {                                                                                     \
        for (int64_t ch = 0; ch < C; ch++) {                                                          \
            if (sp->centered) {                                                                       \
                running_mean[ch] = (T)next[ch];                                                       \
                running_var[ch] = (T)next[C + ch];                                                    \
            } else {                                                                                  \
                running_var[ch] = (T)next[ch];                                                        \
            }                                                                                         \
        }                                                                                             \
        *num_batches_tracked += 1;                                                                    \
    }                                                                                                 \
    if (accum) {                                                                                      \
        for (int64_t i = 0; i < (k + 1) * C; i++) accum[i] = last ? (T)0 : (T)pending[i];             \
        *accum_calls = (*accum_calls + 1) % period;                                                   \
    }                                                                                                 \
    free(rows);                                                                                       \
    return ok;                                                                                        \
}                                                                                                     \
                                                                                                      \
/* Per-group sums of dy (sums[g, ch]) and dy * (x - mean) * invstd (sums[GC + g * C + ch]) */          \
static void gradient_sums_##SUFFIX(const Spec* sp, const T* dy, const T* x, const T* used,          \
                                   double* sums) {                                                    \
    const int64_t C = sp->c, S = sp->s, G = sp->groups, B = sp->n / G, GC = G * C;                    \
    memset(sums, 0, (size_t)(2 * GC) * sizeof(double));                                              \
    for (int64_t n = 0; n < sp->n; n++) {                                                             \
        const int64_t g = n / B;                                                                      \
        const T* mean = used + USED_MEAN * GC + g * C;                                                \
        double* sum_dy = sums + g * C;                                                                \
        double* sum_dyx = sums + GC + g * C;                                                          \
        if (!sp->channels_last) {                                                                     \
            for (int64_t ch = 0; ch < C; ch++) {                                                      \
                const T* p = x + (n * C + ch) * S;                                                    \
                const T* q = dy + (n * C + ch) * S;                                                   \
                const double mu = (double)mean[ch];                                                   \
                double a = 0.0, b = 0.0;                                                              \
                _Pragma("omp simd reduction(+:a, b)")                                                  \
                for (int64_t i = 0; i < S; i++) {                                                     \
                    a += (double)q[i];                                                                \
                    b += (double)q[i] * ((double)p[i] - mu);                                          \
                }                                                                                     \
                sum_dy[ch] += a;                                                                      \
                sum_dyx[ch] += b;                                                                     \
            }                                                                                         \
        } else {                                                                                      \
            for (int64_t i = 0; i < S; i++) {                                                         \
                const T* p = x + (n * S + i) * C;                                                     \
                const T* q = dy + (n * S + i) * C;                                                    \
                _Pragma("omp simd")                                                                   \
                for (int64_t ch = 0; ch < C; ch++) {                                                  \
                    sum_dy[ch] += (double)q[ch];                                                      \
                    sum_dyx[ch] += (double)q[ch] * ((double)p[ch] - (double)mean[ch]);                \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (int64_t i = 0; i < GC; i++) {                                                                \
        sums[i] = (double)(T)sums[i];                                                                 \
        sums[GC + i] = (double)(T)(sums[GC + i] / sqrt((double)used[USED_VAR * GC + i]));             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* The per-group sums of the backward as the caller keeps them ((2, G, C) in T), to reduce over processes */ \
void mabn_gradient_sums_##SUFFIX(const Spec* sp, const T* dy, const T* x, const T* used, T* out) {  \
    const int64_t count = 2 * sp->groups * sp->c;                                                     \
    double* sums = malloc((size_t)count * sizeof(double));                                            \
    gradient_sums_##SUFFIX(sp, dy, x, used, sums);                                                    \
    for (int64_t i = 0; i < count; i++) out[i] = (T)sums[i];                                          \
    free(sums);                                                                                       \
}                                                                                                     \
                                                                                                      \
/*                                                                                                    \
 * One training backward. ``sums`` ((2, G, C): sum dy, sum dy * x_hat) is NULL unless they come from   \
 * elsewhere (reduced over processes); ``numel`` is the values per channel in a group. With a         \
 * backward window (A != NULL) the statistics (g, Psi) of the groups are pushed when finite (mode 0)  \
 * or, for a further backward pass through the same call (mode 1), added to the entries the first     \
 * pass pushed (push != 0) and averaged with the new-entry columns of A only. With accumulation       \
 * (``accum``: its last row counts the step's finite backward passes) the backward call count moves   \
 * at the step's last call (``last``) when any backward of the step was finite. Returns 1 when this   \
 * pass pushed its entries. dx, grad_weight, grad_bias may be NULL (not needed).                      \
 */                                                                                                   \
int64_t mabn_backward_##SUFFIX(const Spec* sp, const T* dy, const T* x, T* dx, const T* used,       \
                               const T* weight, const T* sums_in, const T* A, T* window,              \
                               int64_t* backward_steps, int64_t* backward_calls, int64_t mode,        \
                               int64_t push, T* accum, int64_t last, double numel, T* grad_weight,    \
                               T* grad_bias) {                                                        \
    const int64_t C = sp->c, S = sp->s, G = sp->groups, B = sp->n / G, GC = G * C;                    \
    const int64_t k = sp->centered ? 2 : 1, m = sp->bm;                                               \
    double* sums = malloc((size_t)(2 * GC + (m + G) * k * C + k * GC) * sizeof(double));              \
    double* seq = sums + 2 * GC;                                                                      \
    double* stats = seq + m * k * C; /* the new entries, (G, k, C) */                                 \
    double* avg = seq + (m + G) * k * C; /* the statistics used, statistic-major (k, G, C) */        \
    if (sums_in) {                                                                                    \
        for (int64_t i = 0; i < 2 * GC; i++) sums[i] = (double)sums_in[i];                            \
    } else {                                                                                          \
        gradient_sums_##SUFFIX(sp, dy, x, used, sums);                                                \
    }                                                                                                 \
    for (int64_t i = 0; i < GC; i++) {                                                                \
        const int64_t g = i / C, ch = i % C;                                                          \
        const double gr = (weight ? (double)weight[ch] : 1.0) * (double)used[USED_R * GC + i];        \
        const double gr_n = (double)(T)(gr / numel);                                                  \
        if (sp->centered) stats[(g * k) * C + ch] = (double)(T)(sums[i] * gr_n);                      \
        stats[(g * k + k - 1) * C + ch] = (double)(T)(sums[GC + i] * gr_n);                           \
    }                                                                                                 \
    int ok = 0;                                                                                       \
    if (A) {                                                                                          \
        for (int64_t i = 0; i < m * k * C; i++) seq[i] = (double)window[i];                           \
        if (mode == 0) {                                                                              \
            product_##SUFFIX(A, seq, k * G, (m + G) * k, C, avg);                                     \
            ok = all_finite_##SUFFIX(avg, k * GC);                                                    \
            int counted = ok;                                                                         \
            if (accum) { /* the last row: the step's finite backward passes so far */                 \
                T* row = accum + (k + 1) * C;                                                         \
                const double pending = (double)row[0] + (ok ? 1.0 : 0.0);                             \
                counted = last && pending > 0.0;                                                      \
                for (int64_t ch = 0; ch < C; ch++) row[ch] = last ? (T)0 : (T)pending;                \
            }                                                                                         \
            if (ok) {                                                                                 \
                for (int64_t i = 0; i < m * k * C; i++) window[i] = (T)seq[G * k * C + i];            \
                *backward_steps += G;                                                                 \
            }                                                                                         \
            if (counted) *backward_calls += 1;                                                        \
        } else {                                                                                      \
            /* the new-entry columns of A: each row of A restricted to them, over the entries alone */ \
            const int64_t cols = (m + G) * k;                                                         \
            for (int64_t r = 0; r < k * G; r++) {                                                     \
                double* o = avg + r * C;                                                              \
                memset(o, 0, (size_t)C * sizeof(double));                                             \
                for (int64_t j = m * k; j < cols; j++) {                                              \
                    const double a = (double)A[r * cols + j];                                         \
                    if (a == 0.0) continue;                                                           \
                    for (int64_t ch = 0; ch < C; ch++) o[ch] += a * seq[j * C + ch];                  \
                }                                                                                     \
                for (int64_t ch = 0; ch < C; ch++) o[ch] = (double)(T)o[ch];                          \
            }                                                                                         \
            if (push && all_finite_##SUFFIX(stats, G * k * C)) {                                      \
                const int64_t j = G < m ? G : m;                                                      \
                for (int64_t e = 0; e < j; e++)                                                       \
                    for (int64_t i = 0; i < k * C; i++)                                               \
                        window[(m - j + e) * k * C + i] += (T)stats[(G - j + e) * k * C + i];         \
            }                                                                                         \
        }                                                                                             \
    } else {                                                                                          \
        for (int64_t g = 0; g < G; g++)                                                               \
            for (int64_t s = 0; s < k; s++)                                                           \
                memcpy(avg + (s * G + g) * C, stats + (g * k + s) * C, (size_t)C * sizeof(double));  \
    }                                                                                                 \
    if (dx) {                                                                                         \
        T* a = malloc((size_t)(3 * GC) * sizeof(T));                                                  \
        T* b = a + GC;                                                                                \
        T* c0 = b + GC;                                                                               \
        for (int64_t i = 0; i < GC; i++) {                                                            \
            const int64_t g = i / C, ch = i % C;                                                      \
            const double var = (double)used[USED_VAR * GC + i];                                       \
            const double invstd = 1.0 / sqrt(var);                                                    \
            const double gr = (weight ? (double)weight[ch] : 1.0) * (double)used[USED_R * GC + i];    \
            const double bv = avg[((k - 1) * G + g) * C + ch] / var;                                  \
            a[i] = (T)(gr * invstd);                                                                  \
            b[i] = (T)(-bv);                                                                          \
            c0[i] = sp->centered                                                                      \
                        ? (T)(bv * (double)used[USED_MEAN * GC + i] - avg[g * C + ch] * invstd)       \
                        : (T)0;                                                                       \
        }                                                                                             \
        for (int64_t n = 0; n < sp->n; n++) {                                                         \
            const int64_t o = (n / B) * C;                                                            \
            if (!sp->channels_last) {                                                                 \
                for (int64_t ch = 0; ch < C; ch++) {                                                  \
                    const T av = a[o + ch], bv = b[o + ch], cv = c0[o + ch];                          \
                    const T* p = x + (n * C + ch) * S;                                                \
                    const T* q = dy + (n * C + ch) * S;                                               \
                    T* r = dx + (n * C + ch) * S;                                                     \
                    _Pragma("omp simd")                                                               \
                    for (int64_t i = 0; i < S; i++) r[i] = cv + av * q[i] + bv * p[i];                \
                }                                                                                     \
            } else {                                                                                  \
                for (int64_t i = 0; i < S; i++) {                                                     \
                    const T* p = x + (n * S + i) * C;                                                 \
                    const T* q = dy + (n * S + i) * C;                                                \
                    T* r = dx + (n * S + i) * C;                                                      \
                    _Pragma("omp simd")                                                               \
                    for (int64_t ch = 0; ch < C; ch++)                                                \
                        r[ch] = c0[o + ch] + a[o + ch] * q[ch] + b[o + ch] * p[ch];                   \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        free(a);                                                                                      \
    }                                                                                                 \
    for (int64_t ch = 0; ch < C; ch++) {                                                              \
        double gw = 0.0, gb = 0.0;                                                                    \
        for (int64_t g = 0; g < G; g++) {                                                             \
            const int64_t i = g * C + ch;                                                             \
            gw += (double)used[USED_R * GC + i] * sums[GC + i] + (double)used[USED_D * GC + i] * sums[i]; \
            gb += sums[i];                                                                            \
        }                                                                                             \
        if (grad_weight) grad_weight[ch] = (T)gw;                                                     \
        if (grad_bias) grad_bias[ch] = (T)gb;                                                         \
    }                                                                                                 \
    free(sums);                                                                                       \
    return ok;                                                                                        \
}                                                                                                     \
/* Weight centralization of a (rows, cols) block, rows = output channels: out = in - mean of its row. */ \
/* Each row is centered while it is in cache: one pass over memory (``out`` may be ``in``). */        \
void mabn_centralize_##SUFFIX(int64_t rows, int64_t cols, const T* in, T* out) {                     \
    for (int64_t r = 0; r < rows; r++) {                                                              \
        const T* p = in + r * cols;                                                                   \
        T* q = out + r * cols;                                                                        \
        double sum = 0.0;                                                                             \
        _Pragma("omp simd reduction(+:sum)")                                                          \
        for (int64_t i = 0; i < cols; i++) sum += (double)p[i];                                       \
        const T mean = (T)(sum / (double)cols);                                                       \
        _Pragma("omp simd")                                                                           \
        for (int64_t i = 0; i < cols; i++) q[i] = p[i] - mean;                                        \
    }                                                                                                 \
}

DEFINE_STEP(float, f32)
DEFINE_STEP(double, f64)
