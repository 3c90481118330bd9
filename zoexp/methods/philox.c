/* Counter-based standard-normal noise for zoexp (the "philox" noise backend), CPU kernel.
 *
 * Definition (zoexp/methods/philox.py holds the same definition in pure torch, and the tests check
 * that both agree bit for bit): in a chunk with 64-bit seed s, element i = 64 b + 16 w + l
 * (0 <= w < 4, 0 <= l < 16) is normal w of counter j = 16 b + l, where
 *   (x0, x1, x2, x3) = Philox4x32-10(counter = (j mod 2^32, j >> 32, 0, 0), key = (s mod 2^32, s >> 32))
 *   normals 0, 1 = Box-Muller(x0, x1), normals 2, 3 = Box-Muller(x2, x3)
 *   Box-Muller(a, c) = r cos(theta), r sin(theta) with
 *     r = sqrt(-2 ln u), u = ((a >> 9) + 1/2) 2^-23          (23-bit uniform in (0, 1): |z| < 5.8)
 *     theta = 2 pi ((c >> 9) + 1/2) 2^-23
 *   ln, sin and cos are the polynomials below, evaluated in float32 in exactly the written order.
 * Every operation is an IEEE float32 operation (+, -, *, sqrt, exact conversions and sign flips), so
 * the result does not depend on the vector width, compiler or CPU as long as nothing is contracted
 * into FMAs or reassociated: build WITHOUT -ffast-math and WITH -ffp-contract=off.
 * The 16-lane block layout lets one Philox call per lane fill four contiguous 16-float vectors.
 *
 * No Python or torch headers: the module is built with the system C compiler in about a second and
 * called through ctypes (which releases the GIL, so zoexp runs it on several threads).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define W 16          /* lanes: counters per block */
#define BLOCK (4 * W) /* floats per block */
#define NB 2          /* blocks computed together (independent work keeps the multipliers busy) */
#define GROUP (NB * BLOCK)

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* ln(1 + f) = f - f^2/2 + f^3 P(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1] (about 1 ulp) */
static const float LOG_P[8] = {0x1.555552p-2f, -0x1.0000c8p-2f, 0x1.99a14cp-3f, -0x1.54d54ep-3f,
                               0x1.22dc46p-3f, -0x1.09abecp-3f, 0x1.045944p-3f, -0x1.4bd736p-4f};
/* sin x = x + x^3 S(x^2), cos x = 1 - x^2/2 + x^4 C(x^2) for |x| <= pi/4 (about 1 ulp) */
static const float SIN_P[3] = {-0x1.555554p-3f, 0x1.110ccap-7f, -0x1.9b0218p-13f};
static const float COS_P[3] = {0x1.555554p-5f, -0x1.6c1354p-10f, 0x1.9c05c4p-16f};
#define LN2 0x1.62e430p-1f
#define SQRT2 0x1.6a09e6p+0f
#define HALF_PI_2M22 0x1.921fb6p-22f /* (pi / 2) 2^-22 */

/* Philox state in native vectors of 64-bit lanes (one counter per lane) */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX2__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
typedef uint64_t u64v __attribute__((vector_size(VBYTES)));
#define VL (VBYTES / 8)      /* counters per vector */
#define NV (NB * W / VL)     /* vectors per group */

/* 32 x 32 -> 64-bit products of the low halves of every lane with m */
static inline u64v mul32(u64v a, uint32_t m) {
#if defined(__AVX512F__)
    return (u64v)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(m));
#elif defined(__AVX2__)
    return (u64v)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(m));
#elif defined(__SSE2__)
    return (u64v)_mm_mul_epu32((__m128i)a, _mm_set1_epi64x(m));
#else
    return (a & 0xFFFFFFFFull) * m;
#endif
}

/* Philox4x32-10 of the NV vectors of a group at once. Each 64-bit lane carries its 32-bit word in the
 * low half; high halves may hold garbage, which neither mul32 (it reads low halves) nor the final
 * truncation to 32 bits lets through. */
static inline void philox(u64v c[NV][4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        for (int v = 0; v < NV; v++) {
            u64v p0 = mul32(c[v][0], PHILOX_M0), p1 = mul32(c[v][2], PHILOX_M1);
            c[v][0] = (p1 >> 32) ^ c[v][1] ^ k0;
            c[v][2] = (p0 >> 32) ^ c[v][3] ^ k1;
            c[v][1] = p1;
            c[v][3] = p0;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
}

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* oc[l], os[l] = r cos(theta), r sin(theta) from the words xu[l] (radius) and xa[l] (angle) */
static inline void box_muller(const uint32_t *restrict xu, const uint32_t *restrict xa,
                              float *restrict oc, float *restrict os) {
    for (int l = 0; l < W; l++) {
        /* r = sqrt(-2 ln u), ln u = e ln 2 + ln m with u = m 2^e, m in [sqrt(1/2), sqrt(2)] */
        float u = (float)(int32_t)((xu[l] >> 9) * 2u + 1u) * 0x1p-24f;
        uint32_t bits = as_uint(u);
        int32_t e = (int32_t)(bits >> 23) - 127;
        float m = as_float((bits & 0x007FFFFFu) | 0x3F800000u);
        uint32_t big = (uint32_t)(m > SQRT2); /* selects as bit masks: vectorizable without AVX-512 */
        m = as_float((as_uint(m) & (big - 1u)) | (as_uint(m * 0.5f) & -big));
        e += (int32_t)big;
        float f = m - 1.0f;
        float f2 = f * f;
        float p = LOG_P[7];
        for (int i = 6; i >= 0; i--) p = p * f + LOG_P[i];
        float ln = f + ((f * f2) * p - 0.5f * f2);
        ln = ln + (float)e * LN2;
        float rad = sqrtf(-2.0f * ln);
        /* theta = 2 pi (k + 1/2) 2^-23 = q pi/2 + x with |x| <= pi/4, reduced exactly in integers */
        int32_t k = (int32_t)(xa[l] >> 9);
        int32_t jq = (k + (1 << 20)) >> 21;
        int32_t rem = k - (jq << 21);
        float x = (float)(2 * rem + 1) * HALF_PI_2M22;
        float x2 = x * x;
        float sp = SIN_P[2], cp = COS_P[2];
        for (int i = 1; i >= 0; i--) {
            sp = sp * x2 + SIN_P[i];
            cp = cp * x2 + COS_P[i];
        }
        float sn = x + (x * x2) * sp;
        float cs = (1.0f - 0.5f * x2) + (x2 * x2) * cp;
        /* quadrant q: (cos, sin)(q pi/2 + x) = (c, s), (-s, c), (-c, -s), (s, -c) */
        uint32_t q = (uint32_t)jq & 3u, swap = -(q & 1u);
        uint32_t cv = (as_uint(sn) & swap) | (as_uint(cs) & ~swap);
        uint32_t sv = (as_uint(cs) & swap) | (as_uint(sn) & ~swap);
        oc[l] = rad * as_float(cv ^ (((q + 1u) & 2u) << 30));
        os[l] = rad * as_float(sv ^ ((q & 2u) << 30));
    }
}

/* the GROUP floats of blocks NB g, ..., NB g + NB - 1 of the chunk with seed s */
static void group(uint64_t s, uint64_t g, float *restrict out) {
    u64v c[NV][4];
    for (int v = 0; v < NV; v++) {
        for (int l = 0; l < VL; l++) {
            uint64_t j = g * (NB * W) + (uint64_t)(v * VL + l);
            c[v][0][l] = j & 0xFFFFFFFFu;
            c[v][1][l] = j >> 32;
            c[v][2][l] = 0;
            c[v][3][l] = 0;
        }
    }
    philox(c, (uint32_t)s, (uint32_t)(s >> 32));
    for (int b = 0; b < NB; b++) {
        uint32_t x[4][W];
        for (int w = 0; w < 4; w++) {
            for (int v = 0; v < W / VL; v++) {
                for (int l = 0; l < VL; l++) x[w][v * VL + l] = (uint32_t)c[b * (W / VL) + v][w][l];
            }
        }
        float *o = out + b * BLOCK;
        box_muller(x[0], x[1], o, o + W);
        box_muller(x[2], x[3], o + 2 * W, o + 3 * W);
    }
}

/* out[0:n] = z[start:start+n] of the chunk with seed s */
void zo_philox_normal(uint64_t s, int64_t start, int64_t n, float *restrict out) {
    float tmp[GROUP];
    for (int64_t i = 0; i < n;) {
        int64_t e = start + i, g = e / GROUP, off = e % GROUP;
        int64_t take = GROUP - off < n - i ? GROUP - off : n - i;
        if (take == GROUP) {
            group(s, (uint64_t)g, out + i);
        } else {
            group(s, (uint64_t)g, tmp);
            memcpy(out + i, tmp + off, (size_t)take * sizeof(float));
        }
        i += take;
    }
}

/* p[0:n] = fma(alpha, z[start:start+n], p[0:n]): torch's p.add_(z, alpha=alpha), without a z buffer */
void zo_philox_axpy(uint64_t s, int64_t start, int64_t n, float alpha, float *restrict p) {
    float tmp[GROUP];
    for (int64_t i = 0; i < n;) {
        int64_t e = start + i, g = e / GROUP, off = e % GROUP;
        int64_t take = GROUP - off < n - i ? GROUP - off : n - i;
        group(s, (uint64_t)g, tmp);
        float *q = p + i;
        const float *z = tmp + off;
        for (int64_t t = 0; t < take; t++) q[t] = fmaf(alpha, z[t], q[t]);
        i += take;
    }
}

/* p[0:n] = fma(alpha, z[start:start+n], scale * p[0:n]) with scale * p rounded first:
 * torch's p.mul_(scale).add_(z, alpha=alpha) (weight decay fused with the update) */
void zo_philox_scale_axpy(uint64_t s, int64_t start, int64_t n, float scale, float alpha, float *restrict p) {
    float tmp[GROUP];
    for (int64_t i = 0; i < n;) {
        int64_t e = start + i, g = e / GROUP, off = e % GROUP;
        int64_t take = GROUP - off < n - i ? GROUP - off : n - i;
        group(s, (uint64_t)g, tmp);
        float *q = p + i;
        const float *z = tmp + off;
        for (int64_t t = 0; t < take; t++) {
            float scaled = scale * q[t];
            q[t] = fmaf(alpha, z[t], scaled);
        }
        i += take;
    }
}

/* one Philox4x32-10 call (for the Random123 known-answer test) */
void zo_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}
