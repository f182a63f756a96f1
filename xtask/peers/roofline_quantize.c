// Ceilings for quantizing f32 -> i8 on this machine (issue #2): loops that do less than a
// quantizer, timed on the same sizes. Prints the best of 3000 calls (or argv[2]) of each, in GB/s of f32
// input:
//   read-only       sum of the input (four accumulators)
//   cvt+store16     one vcvtps2dq per 16 values and a saturating 16-byte store
//                   (no scale, no rounding correction, no clamp, no NaN test)
//   cvt+store64     the same, four conversions packed into one 64-byte store
//   cvt+stream64    cvt+store64 with non-temporal stores (what ours does from 8M values on)
//   memcpy(f32)     a copy of the input
// Not part of the build or the tests:
//
//   gcc -O2 -march=x86-64-v4 -o target/roofline_quantize xtask/peers/roofline_quantize.c \
//       && target/roofline_quantize 262144
//   (a second argument sets the number of calls: `target/roofline_quantize 67108864 30`)
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((noinline)) float read_only(const float *x, size_t n) {
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 64) {
        a = _mm512_add_ps(a, _mm512_load_ps(x + i));
        b = _mm512_add_ps(b, _mm512_load_ps(x + i + 16));
        c = _mm512_add_ps(c, _mm512_load_ps(x + i + 32));
        d = _mm512_add_ps(d, _mm512_load_ps(x + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

__attribute__((noinline)) void cvt_store16(const float *x, int8_t *y, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_load_ps(x + i));
        _mm_store_si128((__m128i *)(y + i), _mm512_cvtsepi32_epi8(q));
    }
}

// 64 values converted and saturated to bytes, in one vector
static inline __m512i cvt64(const float *x) {
    __m128i p[4];
    for (int j = 0; j < 4; j++)
        p[j] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_load_ps(x + 16 * j)));
    __m512i o = _mm512_castsi128_si512(p[0]);
    o = _mm512_inserti64x2(o, p[1], 1);
    o = _mm512_inserti64x2(o, p[2], 2);
    return _mm512_inserti64x2(o, p[3], 3);
}

__attribute__((noinline)) void cvt_store64(const float *x, int8_t *y, size_t n) {
    for (size_t i = 0; i < n; i += 64) _mm512_store_si512((void *)(y + i), cvt64(x + i));
}

__attribute__((noinline)) void cvt_stream64(const float *x, int8_t *y, size_t n) {
    for (size_t i = 0; i < n; i += 64) _mm512_stream_si512((void *)(y + i), cvt64(x + i));
    _mm_sfence();
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], 0, 10) : 262144;
    int reps = argc > 2 ? atoi(argv[2]) : 3000;
    n -= n % 64;
    float *x = aligned_alloc(64, n * 4);
    int8_t *y = aligned_alloc(64, n);
    int8_t *z = aligned_alloc(64, n * 4);
    for (size_t i = 0; i < n; i++) x[i] = (float)((i * 7919) % 255) - 127.0f;
    double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
    volatile float sink = 0;
// times one call of `call` and keeps the best in best[i]
#define TIME(i, call)                   \
    do {                                \
        double t = now();               \
        call;                           \
        t = now() - t;                  \
        if (t < best[i]) best[i] = t;   \
    } while (0)
    for (int r = 0; r < reps; r++) {
        TIME(0, sink += read_only(x, n));
        TIME(1, cvt_store16(x, y, n));
        TIME(2, cvt_store64(x, y, n));
        TIME(3, memcpy(z, x, n * 4));
        TIME(4, cvt_stream64(x, y, n));
    }
    printf("n=%zu GB/s of f32: read-only %.1f  cvt+store16 %.1f  cvt+store64 %.1f  "
           "cvt+stream64 %.1f  memcpy(f32) %.1f\n",
           n, n * 4 / best[0] / 1e9, n * 4 / best[1] / 1e9, n * 4 / best[2] / 1e9,
           n * 4 / best[4] / 1e9, n * 4 / best[3] / 1e9);
    return y[7] + z[3] == 1000;
}
