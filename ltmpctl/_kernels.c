/* ltmpctl._kernels: the eval-mode reduction step of LTMP and ToMe (merge, prune, compaction) as one C loop.

In eager torch at batch 1 that step is ~20 tensor ops of a few hundred values each, and each op's fixed cost
(Python, dispatch, allocation; ~10-20 us on a shared CPU) is most of its time: ~0.3 ms a deit_tiny block, 3.8 ms a
forward (benchmarks/ltmp_overhead.py). Here it is one call that touches every value once.

Exactness: the same float32 operations in the same order as the torch code it replaces (plugins/ltmp.py,
`_reduce_single` / `_reduce_packed`; plugins/tome.py): t = x * size per token, merged sources added to their destination in
ascending source order, then t / size. Built without -ffast-math and with -ffp-contract=off (setup.py), so no
reassociation or fused multiply-add changes a rounding; tests/test_kernels.py checks bitwise equality.

Layout: x (T, C) float32 rows of the batch's real tokens, image after image (packed); size (T,) float32;
importance (B, N) (NULL: nothing is pruned) and the padding mask (B, N) uint8 (NULL: every image has N real tokens);
node_max (B, NA) float32 and node_idx (B, NA) int64 from the bipartite matching (NULL: nothing is matched, prune
only), or instead scores (B, NA, NB) float32, the matching's similarities (padded like the mask: each image's real
A rows and B columns come first), whose row maxima over the image's real B columns the kernel takes itself (ties and
NaN as torch's max(dim): the first); src_order (B, R) int64 (NULL: the A tokens above merge_thr merge, ascending):
the A tokens that merge, in the order they are added (ToMe's r most similar, most similar first). Outputs: out_x
(T, C), out_size (T,), out_mask (B * N bytes, or NULL for none; the first B * width hold the new (B, width) mask),
where width = max(kept per image, min_width). Returns (kept rows T', width, threads used): images are independent,
so a batch's are split over up to `threads` threads (the last argument; run_ranges), each image's rows written where
its predecessors' counts put them, the same bytes as one thread writes.

The raw attention statistics may stand in for importance and the matching, which the kernel then reduces itself,
image by image: probs, each image's H float32 (N, N) matrices of attention probabilities at prob_b floats from image
to image and prob_h from head to head (importance: each key's column sum over the image's H * n real query rows,
rows in order, divided by H * n; prefix keys +inf), and keys, float32 at element strides (key_b, key_h, key_n, 1)
for (B, H, N, hd) (ToMe's metric: their sum over heads, divided by its L2 norm; the scores: each A token's dot
products with every B token). One image of N tokens (B = 1, no mask) gives the same statistics as it does inside a
padded batch (padding keys have probability 0, padding rows and columns are never read). These are the torch forms'
values up to rounding (their products and sums run in MKL's order); the decisions follow from them as above. In eager
torch the same statistics were ~12 small ops a block (a head sum, a norm, a division, a product, the importance's
scaling, the padding's weights), each paying its fixed cost.
With raw keys, R > 0 and no src_order (ToMe at batch 1), the kernel also ranks the A tokens itself: the R with the
largest row maxima merge, most similar first, as torch's topk over the row maxima orders them (a NaN ranks highest;
exact ties, which torch's topk leaves in no defined order, by position).

keep_top (topk at batch 1): one image's prefix tokens and its `keep` most important other tokens, in their order,
importance computed from the raw probabilities (H, N, N) as above ("mean"), or as the class token's attention averaged
over heads ("cls"); rows and sizes copied as they are (what torch's gather does).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void *as_ptr(unsigned long long p) { return (void *)(uintptr_t)p; }

/* Row loops, vectorised for the widest vector unit found at run time (the same IEEE roundings in any width). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR
#endif

/* One output row: (x * s) / s, as the reference computes it for a token that absorbed nothing. */
VECTOR static void copy_row(float *restrict out, const float *restrict x, float s, Py_ssize_t C) {
    if (s == 1.0f) {  /* x * 1 / 1 is x exactly: no division (most tokens of LTMP's early blocks) */
        memcpy(out, x, sizeof(float) * C);
        return;
    }
    for (Py_ssize_t c = 0; c < C; c++) out[c] = (x[c] * s) / s;
}

VECTOR static void scale_row(float *restrict out, const float *restrict x, float s, Py_ssize_t C) {
    for (Py_ssize_t c = 0; c < C; c++) out[c] = x[c] * s;
}

VECTOR static void add_scaled_row(float *restrict out, const float *restrict x, float s, Py_ssize_t C) {
    for (Py_ssize_t c = 0; c < C; c++) out[c] += x[c] * s;
}

VECTOR static void divide_row(float *restrict out, float s, Py_ssize_t C) {
    for (Py_ssize_t c = 0; c < C; c++) out[c] /= s;
}

/* The first maximum of a row of n >= 1 values, and its index; a NaN is a maximum (torch's max(dim) and argmax). */
static Py_ssize_t row_argmax(const float *v, Py_ssize_t n, float *best) {
    Py_ssize_t idx = 0;
    float m = v[0];
    for (Py_ssize_t j = 1; j < n && !isnan(m); j++)
        if (v[j] > m || isnan(v[j])) m = v[j], idx = j;
    *best = m;
    return idx;
}

/* acc[j] += row[j]: one query row of probabilities into the keys' column sums. */
VECTOR static void add_row(float *restrict acc, const float *restrict row, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) acc[j] += row[j];
}

/* Dot products of one A token's metric a (hd) with every B token's, bt being the B metrics feature-major (hd x nbp,
   nbp a multiple of 16, zero columns past nb): 16 B tokens at a time, their sums kept in one vector register over
   the features. Each sum runs over the features in order, so any vector width gives the same roundings. */
VECTOR static void dot_row(float *restrict out, const float *restrict a, const float *restrict bt, Py_ssize_t hd,
                           Py_ssize_t nbp) {
    for (Py_ssize_t jb = 0; jb < nbp; jb += 16) {
        float acc[16] = {0.0f};
        for (Py_ssize_t d = 0; d < hd; d++) {
            const float ad = a[d], *b = bt + d * nbp + jb;
            for (int jj = 0; jj < 16; jj++) acc[jj] += ad * b[jj];
        }
        memcpy(out + jb, acc, sizeof(acc));
    }
}

/* Importance (N,) of one image from its attention probabilities (H matrices of N x N, prob_h floats apart), of which
   the first n rows and columns are real (the rest padding, whose probabilities are 0): mean attention received over
   every real (head, query) row, in order, prefix tokens +inf; padding positions get 0. */
static void importance_of(float *restrict imp, const float *restrict probs, Py_ssize_t H, Py_ssize_t prob_h,
                          Py_ssize_t N, Py_ssize_t n, Py_ssize_t P) {
    memset(imp, 0, sizeof(float) * N);
    for (Py_ssize_t h = 0; h < H; h++)
        for (Py_ssize_t r = 0; r < n; r++) add_row(imp, probs + h * prob_h + r * N, n);
    const float rows = (float)(H * n);
    for (Py_ssize_t j = 0; j < n; j++) imp[j] = j < P ? INFINITY : imp[j] / rows;
}

/* Cosine similarity (na, nb) of one image's A tokens to its B tokens by the head sum of its keys (rows at key_n,
   heads at key_h, features contiguous). Scratch: metric N * hd floats, bt hd * nbp, row nbp (nbp: nb rounded up to
   16). */
static void scores_of(float *restrict scores, const float *keys, Py_ssize_t key_h, Py_ssize_t key_n, Py_ssize_t H,
                      Py_ssize_t N, Py_ssize_t hd, Py_ssize_t first_a, Py_ssize_t first_b, Py_ssize_t na,
                      Py_ssize_t nb, Py_ssize_t nbp, float *restrict metric, float *restrict bt, float *restrict row) {
    for (Py_ssize_t n = 0; n < N; n++) {
        float *m = metric + n * hd;
        memcpy(m, keys + n * key_n, sizeof(float) * hd);
        for (Py_ssize_t h = 1; h < H; h++) add_row(m, keys + h * key_h + n * key_n, hd);
        float sq = 0.0f;
        for (Py_ssize_t d = 0; d < hd; d++) sq += m[d] * m[d];
        const float norm = sqrtf(sq);
        for (Py_ssize_t d = 0; d < hd; d++) m[d] /= norm;
    }
    memset(bt, 0, sizeof(float) * hd * nbp);
    for (Py_ssize_t j = 0; j < nb; j++)
        for (Py_ssize_t d = 0; d < hd; d++) bt[d * nbp + j] = metric[(first_b + 2 * j) * hd + d];
    for (Py_ssize_t i = 0; i < na; i++) {
        dot_row(row, metric + (first_a + 2 * i) * hd, bt, hd, nbp);
        memcpy(scores + i * nb, row, sizeof(float) * nb);
    }
}

/* A value and where it came from, for ranking: largest first, a NaN above every number (torch's topk), ties by
   position. */
typedef struct {
    float v;
    Py_ssize_t i;
} ranked;

static int rank_order(const void *pa, const void *pb) {
    const ranked *a = pa, *b = pb;
    const int na = isnan(a->v), nb = isnan(b->v);
    if (na != nb) return na ? -1 : 1;
    if (!na && a->v != b->v) return a->v > b->v ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

/* Sort n values into rank order (in place). */
static void rank(ranked *r, Py_ssize_t n) { qsort(r, (size_t)n, sizeof(ranked), rank_order); }

/* Batched steps run image by image on up to `threads` POSIX threads, made per call (~20-50 us each, so only where
   each gets enough work: WORK_PER_THREAD). Images are independent: each range of images is one thread's, the calling
   thread takes the first; a thread that cannot be started leaves its range to the calling thread. */
#define MAX_THREADS 64
/* Work per extra thread, in floats: of the step's statistics and rows, and of a layout copy (memory-bound: a
   thread's start costs as much as copying ~1M floats on a shared 2-core VM; benchmarks/ltmp_step.py). */
#define WORK_PER_THREAD (1 << 16)
#define COPY_PER_THREAD (1 << 20)

typedef void (*range_fn)(void *ctx, Py_ssize_t b0, Py_ssize_t b1, int worker);

typedef struct {
    range_fn f;
    void *ctx;
    Py_ssize_t b0, b1;
    int worker;
} range_job;

static void *run_job(void *p) {
    range_job *j = p;
    j->f(j->ctx, j->b0, j->b1, j->worker);
    return NULL;
}

/* f over the images [bounds[t], bounds[t + 1]) for t < threads, each range on its own thread. */
static void run_ranges(range_fn f, void *ctx, const Py_ssize_t *bounds, int threads) {
    pthread_t tid[MAX_THREADS];
    range_job jobs[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) {
        jobs[t] = (range_job){f, ctx, bounds[t], bounds[t + 1], t};
        started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    }
    f(ctx, bounds[0], bounds[1], 0);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            f(ctx, bounds[t], bounds[t + 1], t);
    }
}

/* The real tokens of one image's row of a padding mask (N bytes). */
static Py_ssize_t real_tokens(const uint8_t *mask, Py_ssize_t N) {
    Py_ssize_t n = 0;
    for (Py_ssize_t p = 0; p < N; p++) n += mask[p] != 0;
    return n;
}

/* How many threads (1..threads) B images of the given costs (cost[b] > 0, summing to total; NULL: all alike) are
   worth, at least per_thread each, and where their ranges start: bounds (threads + 1) split the total cost about
   evenly. */
static int split_images(Py_ssize_t *bounds, const double *cost, Py_ssize_t B, double total, double per_thread,
                        int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > B) threads = (int)B;
    if (threads > total / per_thread) threads = (int)(total / per_thread);
    if (threads < 1) threads = 1;
    bounds[0] = 0;
    double acc = 0.0;
    Py_ssize_t b = 0;
    for (int t = 1; t < threads; t++) {
        for (; b < B; b++) {
            const double c = cost ? cost[b] : total / B;
            if (acc + c / 2 >= total * t / threads) break;
            acc += c;
        }
        bounds[t] = b;
    }
    bounds[threads] = B;
    return threads;
}

/* One reduction step (merge_prune's arguments, see the top of the file) and what its two passes share. The first
   pass decides, image by image: importance, matching, which A tokens merge and which candidates stay; the second
   writes each image's kept rows at its place in the packed output, known once every image's count is. */
typedef struct {
    const float *x, *size, *imp, *node_max, *scores, *probs, *keys;
    const uint8_t *mask;
    const int64_t *node_idx, *src_order;
    float *out_x, *out_size;
    Py_ssize_t B, N, NA, NB, NAmax, R, C, P, H, hd, key_h, key_n, key_b, prob_h, prob_b, first_a, first_b;
    double merge_thr, prune_thr;
    int matching;
    /* Per image: real tokens, first input row, first output row, kept rows, merges in order (ToMe) */
    Py_ssize_t *n, *row, *out, *kept, *r_b;
    /* ... its importance, matches and merge order (given, or made here: the *_own buffers), merged A tokens (NAmax)
       and kept candidates by position (N). */
    const float **ib;
    const int64_t **jb, **ob;
    float *imp_own;
    int64_t *idx_own, *order_own;
    uint8_t *merged, *keep;
    /* Per worker scratch: the statistics' reductions (scores NAmax x NB, metric N x hd, B's transpose, a row), the
       ranking, destinations' importance and output rows. */
    Py_ssize_t n_stats;
    float *stats, *dst_imp;
    ranked *ranks;
    Py_ssize_t *dst_row;
} step;

static void decide_rows(const step *s, Py_ssize_t b, int w) {
    const Py_ssize_t N = s->N, P = s->P, first_a = s->first_a, first_b = s->first_b, n = s->n[b];
    const float *ib = s->imp ? s->imp + b * N : NULL;
    const int64_t *ob = s->src_order ? s->src_order + b * s->R : NULL;
    int64_t *own_idx = s->idx_own + b * s->NAmax, *own_order = s->order_own + b * s->NAmax;
    const int64_t *jb = s->node_idx ? s->node_idx + b * s->NA : own_idx;
    uint8_t *merged = s->merged + b * s->NAmax, *keep = s->keep + b * N;
    ranked *ranks = s->ranks + w * (s->NAmax + 1);
    float *dst_imp = s->dst_imp + w * (s->NB + 1);
    const Py_ssize_t na = n > first_a ? (n - first_a + 1) / 2 : 0, nb = n > first_b ? (n - first_b + 1) / 2 : 0;
    /* This image's scores (na rows of at least nb), given or reduced here from its raw keys. */
    const float *scb = s->scores ? s->scores + b * s->NA * s->NB : NULL;
    Py_ssize_t s_row = s->NB;
    if (s->probs) {
        float *own = s->imp_own + b * N;
        importance_of(own, s->probs + b * s->prob_b, s->H, s->prob_h, N, n, P);
        ib = own;
    }
    if (s->keys && na > 0 && nb > 0) {
        const Py_ssize_t nbp = (nb + 15) / 16 * 16;
        float *raw_scores = s->stats + w * s->n_stats, *metric = raw_scores + s->NAmax * s->NB;
        float *bt = metric + N * s->hd;
        scores_of(raw_scores, s->keys + b * s->key_b, s->key_h, s->key_n, s->H, n, s->hd, first_a, first_b, na, nb,
                  nbp, metric, bt, bt + s->hd * nbp);
        scb = raw_scores, s_row = nb;
    }
    Py_ssize_t r_b = s->R;
    const int own_max = !ob && scb && nb > 0;  /* the matching's row maxima taken here, from the scores */
    if (own_max)
        for (Py_ssize_t i = 0; i < na; i++) {
            own_idx[i] = row_argmax(scb + i * s_row, nb, &ranks[i].v);
            ranks[i].i = i;
        }
    if (own_max && s->R > 0) {  /* ToMe from raw keys: the R most similar A tokens, ranked */
        rank(ranks, na);
        if (r_b > na) r_b = na;
        for (Py_ssize_t k = 0; k < r_b; k++) own_order[k] = ranks[k].i;
        ob = own_order;
    }
    /* Which A tokens merge: the given ones (ToMe's r most similar), or those above the threshold (LTMP). */
    memset(merged, 0, na);
    if (ob)
        for (Py_ssize_t k = 0; k < r_b; k++) merged[ob[k]] = 1;
    else if (own_max)
        for (Py_ssize_t i = 0; i < na; i++) merged[i] = ranks[i].v > s->merge_thr;
    else if (s->node_idx && s->node_max)  /* node_idx with src_order but none given (R = 0): nothing merges */
        for (Py_ssize_t i = 0; i < na; i++) merged[i] = s->node_max[b * s->NA + i] > s->merge_thr;
    /* A destination's importance becomes the max of its own and its merged sources'. */
    if (ib) {
        for (Py_ssize_t j = 0; j < nb; j++) dst_imp[j] = ib[first_b + 2 * j];
        for (Py_ssize_t i = 0; i < na; i++)
            if (merged[i]) {
                float v = ib[first_a + 2 * i];
                Py_ssize_t j = (Py_ssize_t)jb[i];
                if (v > dst_imp[j]) dst_imp[j] = v;
            }
    }
    /* The candidates that stay: prefix, unmerged A and B tokens above the prune threshold (all without importance). */
    Py_ssize_t kept = 0;
    for (Py_ssize_t p = 0; p < P && p < n; p++) kept += keep[p] = !ib || ib[p] > s->prune_thr;
    for (Py_ssize_t i = 0; i < na; i++) {
        Py_ssize_t p = first_a + 2 * i;
        kept += keep[p] = !merged[i] && (!ib || ib[p] > s->prune_thr);
    }
    for (Py_ssize_t j = 0; j < nb; j++) kept += keep[first_b + 2 * j] = !ib || dst_imp[j] > s->prune_thr;
    s->kept[b] = kept, s->r_b[b] = r_b, s->ib[b] = ib, s->jb[b] = jb, s->ob[b] = ob;
}

static void write_rows(const step *s, Py_ssize_t b, int w) {
    const Py_ssize_t C = s->C, P = s->P, first_a = s->first_a, first_b = s->first_b, n = s->n[b];
    const Py_ssize_t na = n > first_a ? (n - first_a + 1) / 2 : 0, nb = n > first_b ? (n - first_b + 1) / 2 : 0;
    const float *xb = s->x + s->row[b] * C, *sb = s->size + s->row[b];
    float *out_x = s->out_x + s->out[b] * C, *out_size = s->out_size + s->out[b];
    const uint8_t *merged = s->merged + b * s->NAmax, *keep = s->keep + b * s->N;
    const int64_t *jb = s->jb[b], *ob = s->ob[b];
    Py_ssize_t *dst_row = s->dst_row + w * (s->NB + 1), out = 0;
    /* Kept candidates in the reference's order: prefix, unmerged A, then B. */
    for (Py_ssize_t p = 0; p < P && p < n; p++)
        if (keep[p]) {
            copy_row(out_x + out * C, xb + p * C, sb[p], C);
            out_size[out++] = sb[p];
        }
    for (Py_ssize_t i = 0; i < na; i++) {
        Py_ssize_t p = first_a + 2 * i;
        if (keep[p]) {
            copy_row(out_x + out * C, xb + p * C, sb[p], C);
            out_size[out++] = sb[p];
        }
    }
    for (Py_ssize_t j = 0; j < nb; j++) {
        Py_ssize_t p = first_b + 2 * j;
        dst_row[j] = -1;
        if (keep[p]) {
            scale_row(out_x + out * C, xb + p * C, sb[p], C);
            out_size[out] = sb[p];
            dst_row[j] = out++;
        }
    }
    /* Sources into their (kept) destinations, in the reference's order (ascending, or ToMe's most similar first); a
       source whose destination was pruned goes with it. */
    Py_ssize_t n_src = ob ? s->r_b[b] : (s->matching ? na : 0);
    for (Py_ssize_t k = 0; k < n_src; k++) {
        Py_ssize_t i = ob ? (Py_ssize_t)ob[k] : k;
        Py_ssize_t r = merged[i] ? dst_row[jb[i]] : -1;
        if (r < 0) continue;
        add_scaled_row(out_x + r * C, xb + (first_a + 2 * i) * C, sb[first_a + 2 * i], C);
        out_size[r] += sb[first_a + 2 * i];
    }
    for (Py_ssize_t j = 0; j < nb; j++) {
        Py_ssize_t r = dst_row[j];
        if (r >= 0) divide_row(out_x + r * C, out_size[r], C);
    }
}

static void decide_range(void *ctx, Py_ssize_t b0, Py_ssize_t b1, int worker) {
    for (Py_ssize_t b = b0; b < b1; b++) decide_rows(ctx, b, worker);
}

static void write_range(void *ctx, Py_ssize_t b0, Py_ssize_t b1, int worker) {
    for (Py_ssize_t b = b0; b < b1; b++) write_rows(ctx, b, worker);
}

static PyObject *merge_prune(PyObject *self, PyObject *args) {
    unsigned long long px, psize, pimp, pmask, pmax, pidx, pscores, psrc, pox, pos, pom, pprobs = 0, pkeys = 0;
    Py_ssize_t B, N, NA, R, C, P, min_width, H = 0, hd = 0, key_h = 0, key_n = 0, key_b = 0, prob_h = 0, prob_b = 0;
    double merge_thr, prune_thr;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnnddKKKn|KKnnnnnnni", &px, &psize, &pimp, &pmask, &pmax, &pidx,
                          &pscores, &psrc, &B, &N, &NA, &R, &C, &P, &merge_thr, &prune_thr, &pox, &pos, &pom,
                          &min_width, &pprobs, &pkeys, &H, &hd, &key_h, &key_n, &key_b, &prob_h, &prob_b, &threads))
        return NULL;
    step s = {.x = as_ptr(px), .size = as_ptr(psize), .imp = as_ptr(pimp), .node_max = as_ptr(pmax),
              .scores = as_ptr(pscores), .probs = as_ptr(pprobs), .keys = as_ptr(pkeys), .mask = as_ptr(pmask),
              .node_idx = as_ptr(pidx), .src_order = as_ptr(psrc), .out_x = as_ptr(pox), .out_size = as_ptr(pos),
              .B = B, .N = N, .NA = NA, .R = R, .C = C, .P = P, .H = H, .hd = hd, .key_h = key_h, .key_n = key_n,
              .key_b = key_b, .prob_h = prob_h, .prob_b = prob_b, .merge_thr = merge_thr, .prune_thr = prune_thr};
    if ((s.probs || s.keys) && (s.imp || s.scores || s.node_idx || s.node_max || s.src_order)) {
        PyErr_SetString(PyExc_ValueError, "raw attention statistics replace importance and the matching");
        return NULL;
    }
    uint8_t *out_mask = as_ptr(pom);
    /* Set A = even absolute positions >= P, set B = odd ones (tokens.split_ab). */
    s.first_a = P + P % 2, s.first_b = P + 1 - P % 2;
    s.NB = N > s.first_b ? (N - s.first_b + 1) / 2 : 0, s.NAmax = N > s.first_a ? (N - s.first_a + 1) / 2 : 0;
    s.matching = s.node_idx != NULL || s.scores != NULL || s.keys != NULL;
    const Py_ssize_t NBp = (s.NB + 15) / 16 * 16, NAm = s.NAmax + 1, NBm = s.NB + 1;
    s.n_stats = s.keys ? s.NAmax * s.NB + N * hd + hd * NBp + NBp : 0;
    /* Each image's real tokens, first row and work (its probabilities, keys' metric and scores, rows), by which
       the images are split over threads. */
    Py_ssize_t *per_image = malloc(sizeof(Py_ssize_t) * 5 * (B + 1)), bounds[MAX_THREADS + 1];
    double *cost = malloc(sizeof(double) * (B + 1)), total = 0.0;
    if (!per_image || !cost) {
        free(per_image), free(cost);
        return PyErr_NoMemory();
    }
    s.n = per_image, s.row = s.n + B + 1, s.out = s.row + B + 1, s.kept = s.out + B + 1, s.r_b = s.kept + B + 1;
    for (Py_ssize_t b = 0, row = 0; b < B; b++) {
        const Py_ssize_t n = s.mask ? real_tokens(s.mask + b * N, N) : N;
        s.n[b] = n, s.row[b] = row, row += n;
        const double stats = (s.probs ? (double)H * n : 0.0) + (s.keys ? (double)H * hd + (double)n * hd / 4 : 0.0);
        cost[b] = (double)n * (stats + C);
        total += cost[b];
    }
    const int nt = split_images(bounds, cost, B, total, WORK_PER_THREAD, threads);
    s.ib = malloc(sizeof(float *) * (B + 1));
    s.jb = malloc(sizeof(int64_t *) * (B + 1)), s.ob = malloc(sizeof(int64_t *) * (B + 1));
    s.imp_own = malloc(sizeof(float) * (s.probs ? B * N + 1 : 1));
    s.idx_own = malloc(sizeof(int64_t) * B * NAm), s.order_own = malloc(sizeof(int64_t) * B * NAm);
    s.merged = malloc(B * NAm + 1), s.keep = malloc(B * N + 1);
    s.stats = malloc(sizeof(float) * (nt * s.n_stats + 1)), s.dst_imp = malloc(sizeof(float) * nt * NBm);
    s.ranks = malloc(sizeof(ranked) * nt * NAm), s.dst_row = malloc(sizeof(Py_ssize_t) * nt * NBm);
    void *owned[] = {s.ib, s.jb, s.ob, s.imp_own, s.idx_own, s.order_own, s.merged, s.keep, s.stats, s.dst_imp,
                     s.ranks, s.dst_row, per_image, cost};
    const int n_owned = sizeof(owned) / sizeof(owned[0]);
    for (int i = 0; i < n_owned; i++)
        if (!owned[i]) {
            for (int j = 0; j < n_owned; j++) free(owned[j]);
            return PyErr_NoMemory();
        }
    Py_ssize_t out = 0, width = min_width;
    Py_BEGIN_ALLOW_THREADS
    run_ranges(decide_range, &s, bounds, nt);
    for (Py_ssize_t b = 0; b < B; b++) {
        s.out[b] = out, out += s.kept[b];
        if (s.kept[b] > width) width = s.kept[b];
    }
    run_ranges(write_range, &s, bounds, nt);
    if (out_mask)
        for (Py_ssize_t b = 0; b < B; b++)
            for (Py_ssize_t p = 0; p < width; p++) out_mask[b * width + p] = p < s.kept[b];
    Py_END_ALLOW_THREADS
    for (int i = 0; i < n_owned; i++) free(owned[i]);
    return Py_BuildValue("nni", out, width, nt);
}

static PyObject *keep_top(PyObject *self, PyObject *args) {
    unsigned long long px, psize, pprobs, pox, pos;
    Py_ssize_t H, N, C, P, keep;
    int cls;
    if (!PyArg_ParseTuple(args, "KKKnnnnnpKK", &px, &psize, &pprobs, &H, &N, &C, &P, &keep, &cls, &pox, &pos))
        return NULL;
    const float *x = as_ptr(px), *size = as_ptr(psize), *probs = as_ptr(pprobs);
    float *out_x = as_ptr(pox), *out_size = as_ptr(pos);
    if (P > N) P = N;
    if (keep > N - P) keep = N - P;
    if (keep < 0) keep = 0;
    float *imp = malloc(sizeof(float) * (N + 1));
    ranked *ranks = malloc(sizeof(ranked) * (N + 1));
    uint8_t *kept = calloc((size_t)N + 1, 1);
    if (!imp || !ranks || !kept) {
        free(imp), free(ranks), free(kept);
        return PyErr_NoMemory();
    }
    Py_ssize_t out = 0;
    Py_BEGIN_ALLOW_THREADS
    if (cls) {  /* probs[:, 0, :] averaged over the heads */
        memcpy(imp, probs, sizeof(float) * N);
        for (Py_ssize_t h = 1; h < H; h++) add_row(imp, probs + h * N * N, N);
        for (Py_ssize_t j = 0; j < N; j++) imp[j] /= (float)H;
    } else {
        importance_of(imp, probs, H, N * N, N, N, P);
    }
    for (Py_ssize_t j = P; j < N; j++) ranks[j - P].v = imp[j], ranks[j - P].i = j;
    rank(ranks, N - P);
    for (Py_ssize_t k = 0; k < keep; k++) kept[ranks[k].i] = 1;
    for (Py_ssize_t p = 0; p < N; p++)
        if (p < P || kept[p]) {
            memcpy(out_x + out * C, x + p * C, sizeof(float) * C);
            out_size[out++] = size[p];
        }
    Py_END_ALLOW_THREADS
    free(imp), free(ranks), free(kept);
    return PyLong_FromSsize_t(out);
}

/* unpack_heads: a padded batch's qkv projections laid out heads-major for attention (tokens.unpack_qkv). qkv
(T, G * hd) float32, the real tokens' rows packed image after image in the order of the bool mask (B, N); out
(G, B * N, hd): out[g, b * N + n] = the g-th hd-wide slice of the row of token (b, n) where the mask is set, zeros
where it is not. One pass of hd-wide copies, where torch's strided index_copy and index_fill took several.
pack_heads: the way back for attention's output (tokens.pack_heads): heads (G, B * N, hd) -> packed rows (T, G * hd)
of the real tokens, where a transpose copy and an index_select took two passes.
unpack_heads also writes attention's key bias where asked (tokens.unpack_attention): bias (bias_heads, B * N), each
head's copy the same, log_size[row] of a real token's packed row (0 where log_size is not given), -inf in padding.
Both split the images over up to `threads` threads and return how many they used. */
typedef struct {
    float *packed, *heads;  /* (T, G * hd) and (G, B * N, hd); the one read is not written */
    const uint8_t *mask;
    const Py_ssize_t *row;  /* each image's first packed row */
    Py_ssize_t B, N, G, hd;
    float *bias;            /* unpack only, optional: (bias_heads, B * N) */
    const float *log_size;  /* optional: (T,) */
    Py_ssize_t bias_heads;
} heads_job;

static void heads_range(const heads_job *j, Py_ssize_t b0, Py_ssize_t b1, int to_heads) {
    const Py_ssize_t BN = j->B * j->N, width = j->G * j->hd, hd = j->hd, bytes = sizeof(float) * hd;
    float *packed = j->packed + j->row[b0] * width;
    for (Py_ssize_t r = b0 * j->N; r < b1 * j->N; r++) {
        if (to_heads && j->bias) {
            const Py_ssize_t row = (packed - j->packed) / width;  /* this token's packed row, if it is real */
            const float v = !j->mask[r] ? -INFINITY : j->log_size ? j->log_size[row] : 0.0f;
            for (Py_ssize_t g = 0; g < j->bias_heads; g++) j->bias[g * BN + r] = v;
        }
        if (j->mask[r]) {
            for (Py_ssize_t g = 0; g < j->G; g++) {
                float *head = j->heads + (g * BN + r) * hd;
                if (to_heads)
                    memcpy(head, packed + g * hd, bytes);
                else
                    memcpy(packed + g * hd, head, bytes);
            }
            packed += width;
        } else if (to_heads) {
            for (Py_ssize_t g = 0; g < j->G; g++) memset(j->heads + (g * BN + r) * hd, 0, bytes);
        }
    }
}

static void unpack_range(void *ctx, Py_ssize_t b0, Py_ssize_t b1, int worker) { heads_range(ctx, b0, b1, 1); }

static void pack_range(void *ctx, Py_ssize_t b0, Py_ssize_t b1, int worker) { heads_range(ctx, b0, b1, 0); }

static PyObject *heads_copy(PyObject *args, int to_heads) {
    unsigned long long ppacked, pmask, pheads, pbias = 0, plog_size = 0;
    Py_ssize_t B, N, G, hd, bias_heads = 0, bounds[MAX_THREADS + 1];
    int threads = 1, nt;
    if (!PyArg_ParseTuple(args, "KKnnnnK|iKKn", &ppacked, &pmask, &B, &N, &G, &hd, &pheads, &threads, &pbias,
                          &plog_size, &bias_heads))
        return NULL;
    Py_ssize_t *row = malloc(sizeof(Py_ssize_t) * (B + 1));
    if (!row) return PyErr_NoMemory();
    heads_job j = {as_ptr(ppacked), as_ptr(pheads), as_ptr(pmask), row, B, N, G, hd, as_ptr(pbias), as_ptr(plog_size),
                   bias_heads};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0, r = 0; b < B; b++) row[b] = r, r += real_tokens(j.mask + b * N, N);
    /* Every image costs the same: N padded rows of G heads. */
    nt = split_images(bounds, NULL, B, (double)B * N * G * hd, COPY_PER_THREAD, threads);
    run_ranges(to_heads ? unpack_range : pack_range, &j, bounds, nt);
    Py_END_ALLOW_THREADS
    free(row);
    return PyLong_FromLong(nt);
}

/* Arguments: packed (the input), mask, B, N, G, hd, heads (the output), threads; optionally bias, log_size, bias_heads
   (bias 0: none written). */
static PyObject *unpack_heads(PyObject *self, PyObject *args) { return heads_copy(args, 1); }

/* Arguments as unpack_heads' (no bias): packed (the output here), mask, B, N, G, hd, heads (the input), threads. */
static PyObject *pack_heads(PyObject *self, PyObject *args) { return heads_copy(args, 0); }

static PyMethodDef methods[] = {
    {"merge_prune", merge_prune, METH_VARARGS, "LTMP's eval reduction step on raw float32 buffers (see the source)."},
    {"keep_top", keep_top, METH_VARARGS, "topk's batch-1 eval reduction step from raw probabilities (see the source)."},
    {"unpack_heads", unpack_heads, METH_VARARGS, "packed qkv rows -> padded heads-major layout (see the source)."},
    {"pack_heads", pack_heads, METH_VARARGS, "heads-major attention output -> packed rows (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
