/* mergekit's task arithmetic and two-model TIES on bf16 tensors, one pass per chunk.
 *
 * torch runs each of mergekit's steps as its own pass over the chunk (a subtraction per
 * model, a multiplication, a sum, the sign election, a division, an addition): on CPU every
 * bf16 op converts to float32, computes, and rounds back to bf16 (to nearest even). Here the
 * same steps, rounded at the same places, run in one loop, so the chunk is read once and
 * written once. Each function mirrors one Python function of ops/merge/kernels.py, whose
 * docstring says why its steps equal mergekit's; the tests compare both with mergekit.
 *
 * Every result is 0, or 1 where any value on the way is NaN or Inf: the caller then redoes
 * the chunk with torch (which reports the error or takes mergekit's own steps). Built with
 * -ffp-contract=off so that no multiply-add is fused (mergekit rounds between the two).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* 4 or 8 lanes at a time, in GCC/Clang vector extensions (the compiler's own vectorizer
 * gives up on the float <-> bits punning). In the lanes a bf16 value stays a
 * float32 whose low 16 bits are zero: rounding to bf16 is done in place (round to nearest
 * even, then clear the low half), so nothing is narrowed between steps. A comparison gives
 * 0 / all ones per lane. */
#ifdef __AVX2__
#define WS_LANES 8
#else
#define WS_LANES 4 /* wider than the registers, the compiler splits comparisons lane by lane */
#endif
typedef uint16_t vNu16 __attribute__((vector_size(2 * WS_LANES)));
typedef uint32_t vNu32 __attribute__((vector_size(4 * WS_LANES)));
typedef int32_t vNi32 __attribute__((vector_size(4 * WS_LANES)));
typedef float vNf __attribute__((vector_size(4 * WS_LANES)));

/* bf16 bits -> float32 bits, for the `left` elements from p on: a whole vector, or the
 * last few with +0 in the lanes past the end (they compute finite values nobody stores). */
static inline vNu32 loadv(const uint16_t *p, int64_t left) {
    vNu16 v = {0};
    if (left >= WS_LANES)
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)left * sizeof *p);
    return __builtin_convertvector(v, vNu32) << 16;
}

/* All ones in the lanes whose bit is set: keep bits i .. i + WS_LANES - 1 (i a multiple of
 * WS_LANES, and element i exists, so byte i / 8 does), bit i % 8 of byte i / 8. */
static inline vNu32 loadv_keep(const uint8_t *bits, int64_t i) {
#if WS_LANES == 8
    const vNu32 lane = {1, 2, 4, 8, 16, 32, 64, 128};
#else
    const vNu32 lane = {1, 2, 4, 8};
#endif
    uint32_t byte = (uint32_t)(bits[i >> 3] >> (i & 7));
    return (vNu32)((byte & lane) != 0);
}

static inline void storev(uint16_t *p, vNu32 u, int64_t left) { /* loadv's counterpart */
    vNu16 v = __builtin_convertvector(u >> 16, vNu16);
    if (left >= WS_LANES)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, (size_t)left * sizeof *p);
}

static inline vNu32 rndv(vNf f) { /* float32 -> the float32 bits of its bf16 rounding */
    vNu32 u = (vNu32)f;
    vNu32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    /* a signed comparison (both sides are below 2^31): SSE2 has no unsigned one */
    vNu32 nan = (vNu32)((vNi32)(u & 0x7FFFFFFFu) > 0x7F800000);
    return (rounded & ~nan) | (0x7FC00000u & nan);
}

#define F(u) ((vNf)(u))
/* all ones in the lanes whose value is NaN or Inf */
#define WS_NONFINITE_V(u) ((vNu32)(((u)&0x7F800000u) == 0x7F800000u))

static inline unsigned any_lane(vNu32 v) {
    unsigned any = 0;
    for (int lane = 0; lane < WS_LANES; ++lane) any |= v[lane] != 0;
    return any;
}

/* ties_pair after the trim: x0, x1, base: (m,) bf16 bits; keep0/keep1: the trim's masks as
 * bits (bit i % 8 of byte i / 8 clear where it dropped element i), or NULL (density 1);
 * w0, w1: the weights rounded to bf16; divisors: the four bf16 divisors by
 * (agree0 + 2 * agree1), or NULL (no normalize); lam: applied when use_lam. out: (m,) bf16
 * bits. The loop has no branches (selects and masks) and is instantiated per option. */
static inline __attribute__((always_inline)) unsigned ties_pair(
    const uint16_t *x0, const uint16_t *x1, const uint16_t *base, const uint8_t *keep0,
    const uint8_t *keep1, int64_t m, float w0, float w1, const uint16_t *divisors, float lam,
    const int has_keep, const int has_div, const int has_lam, uint16_t *out) {
    uint16_t none = 0, first = 0, second = 0, both = 0;
    if (has_div) none = divisors[0], first = divisors[1], second = divisors[2], both = divisors[3];
    const uint32_t dn = (uint32_t)none << 16, df = (uint32_t)first << 16,
                   ds = (uint32_t)second << 16, db = (uint32_t)both << 16;
    vNu32 bad = {0};
    for (int64_t i = 0; i < m; i += WS_LANES) {
        int64_t left = m - i;
        vNu32 b = loadv(base + i, left);
        vNu32 d0 = rndv(F(loadv(x0 + i, left)) - F(b)), d1 = rndv(F(loadv(x1 + i, left)) - F(b));
        bad |= WS_NONFINITE_V(d0) | WS_NONFINITE_V(d1);
        if (has_keep) { /* dropped: +0 */
            d0 &= loadv_keep(keep0, i);
            d1 &= loadv_keep(keep1, i);
        }
        d0 = rndv(F(d0) * w0);
        d1 = rndv(F(d1) * w1);
        vNu32 total = rndv(F(d0) + F(d1)); /* the elected sign is total's */
        bad |= WS_NONFINITE_V(d0) | WS_NONFINITE_V(d1) | WS_NONFINITE_V(total);
        /* all ones where the delta is nonzero and has total's sign */
        vNu32 a0 = (vNu32)((d0 & 0x7FFFFFFFu) != 0) & (vNu32)(((d0 ^ total) >> 31) == 0);
        vNu32 a1 = (vNu32)((d1 & 0x7FFFFFFFu) != 0) & (vNu32)(((d1 ^ total) >> 31) == 0);
        vNu32 mixed = rndv(F(d0 & a0) + F(d1 & a1));
        if (has_div) {
            vNu32 pick = (a0 & a1 & (db ^ df ^ ds ^ dn)) ^ (a0 & (df ^ dn)) ^ (a1 & (ds ^ dn)) ^ dn;
            mixed = rndv(F(mixed) / F(pick));
        }
        if (has_lam) mixed = rndv(F(mixed) * lam);
        vNu32 o = rndv(F(b) + F(mixed));
        bad |= WS_NONFINITE_V(o);
        storev(out + i, o, left);
    }
    return any_lane(bad);
}

int ws_ties_pair_bf16(const uint16_t *x0, const uint16_t *x1, const uint16_t *base,
                      const uint8_t *keep0, const uint8_t *keep1, int64_t m, float w0,
                      float w1, const uint16_t *divisors, float lam, int use_lam,
                      uint16_t *out) {
#define WS_TIES(K, D, L) \
    ties_pair(x0, x1, base, keep0, keep1, m, w0, w1, divisors, lam, K, D, L, out)
    int k = keep0 != NULL && keep1 != NULL, d = divisors != NULL, l = use_lam != 0;
    if ((keep0 != NULL) != (keep1 != NULL)) return 2; /* both or neither */
    unsigned bad = k ? (d ? (l ? WS_TIES(1, 1, 1) : WS_TIES(1, 1, 0))
                          : (l ? WS_TIES(1, 0, 1) : WS_TIES(1, 0, 0)))
                     : (d ? (l ? WS_TIES(0, 1, 1) : WS_TIES(0, 1, 0))
                          : (l ? WS_TIES(0, 0, 1) : WS_TIES(0, 0, 0)));
#undef WS_TIES
    return bad != 0;
}

/* gta_chunk for task arithmetic with one or two models (no normalize): x1 NULL for one
 * model. mixed = d0 * w0 (+ d1 * w1), + 0.0 (an all -0 sum becomes +0, as mergekit's
 * reduction from +0 gives), then * lam, and base + mixed. */
static inline __attribute__((always_inline)) unsigned task_arithmetic(
    const uint16_t *x0, const uint16_t *x1, const uint16_t *base, int64_t m, float w0,
    float w1, float lam, const int two, const int has_lam, uint16_t *out) {
    vNu32 bad = {0};
    for (int64_t i = 0; i < m; i += WS_LANES) {
        int64_t left = m - i;
        vNu32 b = loadv(base + i, left);
        vNu32 mixed = rndv(F(rndv(F(loadv(x0 + i, left)) - F(b))) * w0);
        if (two)
            mixed = rndv(F(mixed) + F(rndv(F(rndv(F(loadv(x1 + i, left)) - F(b))) * w1)));
        mixed = rndv(F(mixed) + 0.0f);
        if (has_lam) mixed = rndv(F(mixed) * lam);
        vNu32 o = rndv(F(b) + F(mixed));
        bad |= WS_NONFINITE_V(o) | WS_NONFINITE_V(mixed);
        storev(out + i, o, left);
    }
    return any_lane(bad);
}

int ws_task_arithmetic_bf16(const uint16_t *x0, const uint16_t *x1, const uint16_t *base,
                            int64_t m, float w0, float w1, float lam, int use_lam,
                            uint16_t *out) {
#define WS_TA(T, L) task_arithmetic(x0, x1, base, m, w0, w1, lam, T, L, out)
    unsigned bad = x1 ? (use_lam ? WS_TA(1, 1) : WS_TA(1, 0))
                      : (use_lam ? WS_TA(0, 1) : WS_TA(0, 0));
#undef WS_TA
    return bad != 0;
}

/* The lanes of the vector loops in this build: 8 with AVX2, else 4. */
int ws_vector_lanes(void) { return WS_LANES; }
