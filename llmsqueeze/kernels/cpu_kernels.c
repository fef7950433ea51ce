/* CPU kernels for packed weights with float32 activations (AVX2 + FMA + F16C; no AVX-512, no
 * native bf16/int8 dot products needed; built with -mavx512f -mavx512bw where the CPU has them, the
 * GEMV's strips are then 16-wide). Built on first use by llmsqueeze/kernels/cpu.py with the
 * system C compiler and called through ctypes; OpenMP regions run on torch's own OpenMP runtime
 * (the library is loaded after torch, whose libgomp.so.1 then satisfies ours).
 *
 * Layouts are the checkpoint's (GPTQ, true zero points), read in place, never repacked:
 *   qweight int32 [K_pad * bits / 32, N]   32/bits values of consecutive k per word, first in the low bits
 *   scales  [ng, N]                        float32, float16 or bfloat16 (scode 0 / 1 / 2)
 *   qzeros  int32 [ng, zstride]            packed along N the same way
 *   group g covers k in [g*G, min(g*G + G, K)); K_pad = K rounded up to 32, padded values are 0.
 *
 * lsq_gemv_q:   y[m, n] = bias[n] + sum_g s[g,n] * (sum_{k in g} x[m,k] q[k,n] - z[g,n] sum_{k in g} x[m,k])
 *               the inner sums in float32 FMAs on the unpacked codes. A code j of a word is taken as
 *               (word & (mask << bits*j)), i.e. q * 2^(bits*j), converted exactly to float, against x
 *               pre-multiplied by 2^-(bits*j) (exact: a power of two): one AND + one convert per 8
 *               codes instead of shift + AND + convert. The same products as x * q, bit for bit.
 * lsq_gemv_qx:  the same with x and y in float16 / bfloat16 (converted here, y rounded as torch rounds).
 * lsq_dequant_q: columns [n0, n1) of W^T [K, N] as float32 [K, n1 - n0] = (q - z) * s, the same
 *               expression (and bits) as QuantLinear.dequantize_weight_t; for prefill, where W^T
 *               then goes to the BLAS GEMM (column chunks bound the scratch buffer).
 * lsq_gemv_w16: y[m, n] = bias[n] + sum_k x[m, k] w[n, k] with w [N, K] in bfloat16 / float16
 *               (a dense Linear kept in its 16-bit storage, computed in float32).
 * Return 0, or a negative code for arguments the kernel does not take (the caller falls back).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LSQ_VERSION 3

int lsq_version(void) { return LSQ_VERSION; }

/* ---------------------------------------------------------------------------------------------- */
/* 8 consecutive scales as float32                                                                  */

static inline __m256 load8_scales(const void *s, int64_t idx, int scode) {
    if (scode == 0) return _mm256_loadu_ps((const float *)s + idx);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)s + idx));
    if (scode == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* a 16-bit float (code 1: IEEE half, 2: bfloat16) to float32, exactly */
static inline float half_to_float(uint16_t h, int code) {
    if (code == 1) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 to a 16-bit float, rounded to nearest even as torch's .to() rounds (a NaN stays a quiet NaN) */
static inline uint16_t float_to_half(float f, int code) {
    if (code == 1) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float load1_scale(const void *s, int64_t idx, int scode) {
    if (scode == 0) return ((const float *)s)[idx];
    return half_to_float(((const uint16_t *)s)[idx], scode);
}

/* the zero point of column n in group row zrow (packed along N like qweight along K) */
static inline int zero1(const int32_t *zrow, int64_t n, int bits) {
    int64_t bit = n * bits;
    return (int)(((uint32_t)zrow[bit >> 5] >> (bit & 31)) & ((1u << bits) - 1));
}

/* zeros of columns n..n+7 (n a multiple of 8) as float32 */
static inline __m256 load8_zeros(const int32_t *zrow, int64_t n, int bits) {
    if (bits == 4) {
        __m256i w = _mm256_set1_epi32(zrow[n >> 3]);
        __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, sh), _mm256_set1_epi32(15)));
    }
    return _mm256_setr_ps((float)zero1(zrow, n, bits), (float)zero1(zrow, n + 1, bits),
                          (float)zero1(zrow, n + 2, bits), (float)zero1(zrow, n + 3, bits),
                          (float)zero1(zrow, n + 4, bits), (float)zero1(zrow, n + 5, bits),
                          (float)zero1(zrow, n + 6, bits), (float)zero1(zrow, n + 7, bits));
}

/* ---------------------------------------------------------------------------------------------- */
/* packed GEMV                                                                                      */

typedef struct {
    const float *xs;      /* [M, Kp] x pre-scaled by 2^-(bits * (k % per)) except the top code; 0 past K */
    const float *x;       /* [M, K] the input as given (tail columns) */
    const float *xsum;    /* [M, ng] sum of x over each group */
    const int32_t *qweight;
    const void *scales;
    const int32_t *qzeros;
    float *out;           /* [M, N] */
    int64_t M, K, Kp, N, G, ng, zstride;
    int scode, bits;
} GemvArgs;

/* one column n (the N % 8 tail), rows [m0, m0 + mt), group g, scalar */
static void gemv_col(const GemvArgs *a, int64_t m0, int64_t mt, int64_t n, int64_t g) {
    const int bits = a->bits, per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1;
    const int64_t k0 = g * a->G, k1 = k0 + a->G < a->K ? k0 + a->G : a->K;
    const float s = load1_scale(a->scales, g * a->N + n, a->scode);
    const float z = (float)zero1(a->qzeros + g * a->zstride, n, bits);
    for (int64_t m = m0; m < m0 + mt; ++m) {
        const float *x = a->x + m * a->K;
        float acc = 0.f;
        for (int64_t k = k0; k < k1; ++k) {
            uint32_t word = (uint32_t)a->qweight[(k / per) * a->N + n];
            acc += x[k] * (float)((word >> (bits * (k % per))) & mask);
        }
        a->out[m * a->N + n] += s * (acc - z * a->xsum[m * a->ng + g]);
    }
}

static int nv_for(int mt) { return mt <= 2 ? 4 : 2; }

/* the tile 8 columns to a vector (AVX2) */
#define TW 8
#define TILE gemv_tile
#define DISPATCH gemv_dispatch
#define VF __m256
#define VI __m256i
#define V_ZERO() _mm256_setzero_ps()
#define V_LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define V_SET1I(i) _mm256_set1_epi32(i)
#define V_AND(a, b) _mm256_and_si256(a, b)
#define V_SRL(a, count) _mm256_srl_epi32(a, count)
#define V_CVT(v) _mm256_cvtepi32_ps(v)
#define V_FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_FNMADD(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define V_SET1(f) _mm256_set1_ps(f)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_SCALES load8_scales
#define V_ZEROS load8_zeros
#include "cpu_gemv_tile.inc"
#undef TW
#undef TILE
#undef DISPATCH
#undef VF
#undef VI
#undef V_ZERO
#undef V_LOADI
#undef V_SET1I
#undef V_AND
#undef V_SRL
#undef V_CVT
#undef V_FMADD
#undef V_FNMADD
#undef V_SET1
#undef V_ADD
#undef V_LOAD
#undef V_STORE
#undef V_SCALES
#undef V_ZEROS

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* the same tile 16 columns to a vector (the build for AVX-512 CPUs: twice the codes per convert and
 * per FMA; 32 vector registers hold the MT x NV x AS accumulators). n0 a multiple of 16. */
#define LSQ_WIDE 16

static inline __m512 load16_scales(const void *s, int64_t idx, int scode) {
    if (scode == 0) return _mm512_loadu_ps((const float *)s + idx);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)s + idx));
    if (scode == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16_zeros(const int32_t *zrow, int64_t n, int bits) {
    if (bits == 4) {  /* columns n..n+15: two whole words */
        __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(zrow[n >> 3])),
                                       _mm256_set1_epi32(zrow[(n >> 3) + 1]), 1);
        __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(w, sh), _mm512_set1_epi32(15)));
    }
    float z[16];
    for (int i = 0; i < 16; ++i) z[i] = (float)zero1(zrow, n + i, bits);
    return _mm512_loadu_ps(z);
}

#define TW 16
#define TILE gemv_tile16
#define DISPATCH gemv_dispatch16
#define VF __m512
#define VI __m512i
#define V_ZERO() _mm512_setzero_ps()
#define V_LOADI(p) _mm512_loadu_si512((const void *)(p))
#define V_SET1I(i) _mm512_set1_epi32(i)
#define V_AND(a, b) _mm512_and_si512(a, b)
#define V_SRL(a, count) _mm512_srl_epi32(a, count)
#define V_CVT(v) _mm512_cvtepi32_ps(v)
#define V_FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_FNMADD(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define V_SET1(f) _mm512_set1_ps(f)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_SCALES load16_scales
#define V_ZEROS load16_zeros
#include "cpu_gemv_tile.inc"
#define STRIP_DISPATCH gemv_dispatch16
#else
#define LSQ_WIDE 8
#define STRIP_DISPATCH gemv_dispatch
#endif

int lsq_wide(void) { return LSQ_WIDE; }

int lsq_gemv_q(const float *x, int64_t M, int64_t K, const int32_t *qweight, const void *scales, int scode,
               const int32_t *qzeros, int64_t zstride, const float *bias, float *out, int64_t N, int64_t G,
               int bits, int nthreads) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const int per = 32 / bits;
    if (G <= 0 || G % per || M <= 0 || K <= 0 || N <= 0 || scode < 0 || scode > 2) return -2;
    const int64_t Kp = (K + 31) / 32 * 32, ng = (K + G - 1) / G;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * Kp + M * ng));
    if (!xs) return -3;
    float *xsum = xs + M * Kp;
    for (int64_t m = 0; m < M; ++m) {
        const float *xm = x + m * K;
        float *xsm = xs + m * Kp;
        for (int64_t k = 0; k < Kp; ++k) {
            int j = (int)(k % per);
            float v = k < K ? xm[k] : 0.f;
            xsm[k] = j == per - 1 ? v : v * (1.0f / (float)(1u << (bits * j)));
        }
        for (int64_t g = 0; g < ng; ++g) {
            float s = 0.f;
            int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
            for (int64_t k = g * G; k < k1; ++k) s += xm[k];
            xsum[m * ng + g] = s;
        }
    }
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias ? bias[n] : 0.f;
    GemvArgs a = {xs, x, xsum, qweight, scales, qzeros, out, M, K, Kp, N, G, ng, zstride, scode, bits};
    const int64_t n8 = N / 8 * 8, nw = N / LSQ_WIDE * LSQ_WIDE;
    /* rows in tiles of up to 4; columns in strips of LSQ_WIDE*NV, each thread a contiguous range of
     * strips (fewer, narrower strips where they would not split evenly over the threads); groups
     * outermost inside a thread, so a group's rows stream as parallel sequential runs */
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mt = (int)(M - m0 < 4 ? M - m0 : 4);
        int nv = nv_for(mt);
        while (nv > 1 && (nw / (LSQ_WIDE * nv) < 2 * nthreads
                          || (nw / (LSQ_WIDE * nv) % nthreads && nw / (LSQ_WIDE * nv) < 8 * nthreads)))
            nv /= 2;
        const int64_t width = LSQ_WIDE * nv, nstrips = nw / width;
#pragma omp parallel num_threads(nthreads)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            const int64_t s0 = nstrips * t / nt, s1 = nstrips * (t + 1) / nt;
            for (int64_t g = 0; g < ng; ++g) {
                for (int64_t s = s0; s < s1; ++s) STRIP_DISPATCH(&a, m0, mt, s * width, g, nv);
                if (t == nt - 1) {  /* what the strips leave: whole vectors, 8 columns, single columns */
                    for (int64_t n = nstrips * width; n < nw; n += LSQ_WIDE) STRIP_DISPATCH(&a, m0, mt, n, g, 1);
                    for (int64_t n = nw; n < n8; n += 8) gemv_dispatch(&a, m0, mt, n, g, 1);
                    for (int64_t n = n8; n < N; ++n) gemv_col(&a, m0, mt, n, g);
                }
            }
        }
    }
    free(xs);
    return 0;
}

/* lsq_gemv_q with x [M, K] and out [M, N] in xcode's dtype (0 float32, 1 float16, 2 bfloat16): the
 * conversions of a 16-bit model's decode done here, not as two more torch ops a call */
int lsq_gemv_qx(const void *x, int xcode, int64_t M, int64_t K, const int32_t *qweight, const void *scales,
                int scode, const int32_t *qzeros, int64_t zstride, const float *bias, void *out, int64_t N,
                int64_t G, int bits, int nthreads) {
    if (xcode == 0)
        return lsq_gemv_q((const float *)x, M, K, qweight, scales, scode, qzeros, zstride, bias, (float *)out, N, G,
                          bits, nthreads);
    if (xcode != 1 && xcode != 2) return -2;
    if (M <= 0 || K <= 0 || N <= 0) return -2;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K + M * N));
    if (!xf) return -3;
    float *yf = xf + M * K;
    for (int64_t i = 0; i < M * K; ++i) xf[i] = half_to_float(((const uint16_t *)x)[i], xcode);
    int rc = lsq_gemv_q(xf, M, K, qweight, scales, scode, qzeros, zstride, bias, yf, N, G, bits, nthreads);
    if (rc == 0)
        for (int64_t i = 0; i < M * N; ++i) ((uint16_t *)out)[i] = float_to_half(yf[i], xcode);
    free(xf);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* dequantize to W^T [K, N] float32                                                                  */

int lsq_dequant_q(const int32_t *qweight, const void *scales, int scode, const int32_t *qzeros, int64_t zstride,
                  float *out, int64_t K, int64_t N, int64_t G, int bits, int64_t n0, int64_t n1, int nthreads) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const int per = 32 / bits;
    if (G <= 0 || K <= 0 || N <= 0 || scode < 0 || scode > 2 || n0 < 0 || n1 > N || n0 >= n1) return -2;
    enum { CHUNK = 512 };  /* columns per task: its scales and zeros sit in two small float rows */
    const int64_t ng = (K + G - 1) / G, nchunks = (n1 - n0 + CHUNK - 1) / CHUNK, ldo = n1 - n0;
    const uint32_t mask = (1u << bits) - 1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < ng; ++g) {
        for (int64_t c = 0; c < nchunks; ++c) {
            float sf[CHUNK], zf[CHUNK];
            const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            const int64_t c0 = n0 + c * CHUNK, c1 = c0 + CHUNK < n1 ? c0 + CHUNK : n1;
            const int64_t v1 = c0 + (c1 - c0) / 8 * 8;
            const int32_t *zrow = qzeros + g * zstride;
            for (int64_t n = c0; n < c1; ++n) {
                sf[n - c0] = load1_scale(scales, g * N + n, scode);
                zf[n - c0] = (float)zero1(zrow, n, bits);
            }
            const __m256i m = _mm256_set1_epi32((int)mask);
            for (int64_t k = k0; k < k1; ++k) {  /* one row of W^T at a time: contiguous stores */
                const int32_t *wrow = qweight + (k / per) * N;
                const __m128i sh = _mm_cvtsi32_si128(bits * (int)(k % per));
                float *orow = out + k * ldo - n0;  /* columns [n0, n1) of row k */
                for (int64_t n = c0; n < v1; n += 8) {
                    __m256i c8 = _mm256_and_si256(_mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)(wrow + n)), sh), m);
                    __m256 q = _mm256_cvtepi32_ps(c8);
                    _mm256_storeu_ps(orow + n, _mm256_mul_ps(_mm256_sub_ps(q, _mm256_loadu_ps(zf + n - c0)),
                                                             _mm256_loadu_ps(sf + n - c0)));
                }
                for (int64_t n = v1; n < c1; ++n)
                    orow[n] = ((float)(((uint32_t)wrow[n] >> (bits * (k % per))) & mask) - zf[n - c0]) * sf[n - c0];
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* 16-bit weights, float32 activations                                                               */

static inline __m256 load8_w16(const uint16_t *p, int wcode) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (wcode == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* rows [n0, n0 + NR) of w against rows [m0, m0 + MT) of x */
static inline __attribute__((always_inline)) void w16_tile(const float *x, const uint16_t *w, int wcode,
                                                           const float *bias, float *out, int64_t K, int64_t N,
                                                           int64_t m0, int64_t n0, const int MT, const int NR) {
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
    const int64_t k8 = K / 8 * 8;
    for (int64_t k = 0; k < k8; k += 8) {
        __m256 xv[4];
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            __m256 f = load8_w16(w + (n0 + r) * K + k, wcode);
#pragma GCC unroll 4
            for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(f, xv[m], acc[m][r]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
            float s = hsum8(acc[m][r]);
            for (int64_t k = k8; k < K; ++k) s += half_to_float(w[(n0 + r) * K + k], wcode) * x[(m0 + m) * K + k];
            out[(m0 + m) * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.f);
        }
}

int lsq_gemv_w16(const float *x, int64_t M, int64_t K, const uint16_t *w, int wcode, const float *bias,
                 float *out, int64_t N, int nthreads) {
    if ((wcode != 1 && wcode != 2) || M <= 0 || K <= 0 || N <= 0) return -2;
    const int64_t n4 = N / 4 * 4;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mt = (int)(M - m0 < 4 ? M - m0 : 4);
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            if (n0 < n4) {
                switch (mt) {
                    case 1: w16_tile(x, w, wcode, bias, out, K, N, m0, n0, 1, 4); break;
                    case 2: w16_tile(x, w, wcode, bias, out, K, N, m0, n0, 2, 4); break;
                    case 3: w16_tile(x, w, wcode, bias, out, K, N, m0, n0, 3, 4); break;
                    default: w16_tile(x, w, wcode, bias, out, K, N, m0, n0, 4, 4); break;
                }
            } else {
                for (int64_t n = n0; n < N; ++n) w16_tile(x, w, wcode, bias, out, K, N, m0, n, 1, 1);
            }
        }
        if (mt > 1)  /* the tail rows above ran for row m0 only */
            for (int64_t m = m0 + 1; m < m0 + mt; ++m)
                for (int64_t n = n4; n < N; ++n) w16_tile(x, w, wcode, bias, out, K, N, m, n, 1, 1);
    }
    return 0;
}
