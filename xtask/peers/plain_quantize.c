// The "plain AVX-512 C loop" of issue #2's calibration: quantize f32 -> i8 per tensor, zero
// point 0, round half to even, saturate (no NaN handling), compiled by gcc's vectoriser. Two
// versions: x / scale (ONNX Runtime's codes) and x * (1 / scale) (not always the same codes).
// Prints the best of 3000 calls in GB/s of f32 input. Not part of the build or the tests:
//
//   gcc -O3 -march=x86-64-v4 -mprefer-vector-width=512 -fno-math-errno -fno-trapping-math \
//       -o target/plain_quantize xtask/peers/plain_quantize.c -lm && target/plain_quantize 262144
//
// (restrict and the explicit clamps are what let gcc 12 vectorise it: fminf/fmaxf, nearbyintf
// or an int8_t* that may alias the input keep it scalar.)
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
__attribute__((noinline)) void quantize_div(const float *restrict x, int8_t *restrict y, size_t n, float s) {
    for (size_t i = 0; i < n; i++) {
        float v = rintf(x[i] / s);
        v = v < -128.0f ? -128.0f : v; v = v > 127.0f ? 127.0f : v;
        y[i] = (int8_t)(int)v;
    }
}
__attribute__((noinline)) void quantize_mul(const float *restrict x, int8_t *restrict y, size_t n, float s) {
    float r = 1.0f / s;
    for (size_t i = 0; i < n; i++) {
        float v = rintf(x[i] * r);
        v = v < -128.0f ? -128.0f : v; v = v > 127.0f ? 127.0f : v;
        y[i] = (int8_t)(int)v;
    }
}
int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], 0, 10) : 262144;
    float *x = aligned_alloc(64, n * 4); int8_t *y = aligned_alloc(64, n);
    uint64_t st = 1;
    for (size_t i = 0; i < n; i++) { st = st * 6364136223846793005ULL + 1442695040888963407ULL; x[i] = ((int)(st >> 40) % 20000) / 100.0f - 100.0f; }
    for (int which = 0; which < 2; which++) {
        double best = 1e9;
        for (int rep = 0; rep < 3000; rep++) {
            double t = now();
            if (which == 0) quantize_div(x, y, n, 0.7f); else quantize_mul(x, y, n, 0.7f);
            t = now() - t; if (t < best) best = t;
        }
        printf("%s n=%zu best %.2f GB/s of f32 (y[7]=%d)\n", which ? "mul" : "div", n, n * 4 / best / 1e9, y[7]);
    }
}
