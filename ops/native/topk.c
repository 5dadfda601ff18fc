/* The k largest of n 16-bit keys, ties broken as torch's CPU argsort breaks them.
 *
 * This is the C form of ops/merge/trim.py's numpy replay (`_pack` + `_replay`): see the
 * comment above `_BLOCK` there for why following only the segment that holds position k of
 * libstdc++'s introsort gives exactly the first k of the full sort. numpy has to express
 * Hoare's partition as masks, counts and gathers (about 11 ns an element on the bench
 * machine); here it is the partition loop itself (its scans a block at a time, with AVX2
 * where the build targets it), 2.5 ns an element there, and it runs without the GIL so two
 * merge workers select at the same time.
 *
 * Built on first use by ops/native/__init__.py with the system C compiler (no Python or
 * torch headers: plain C99 called through ctypes).
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, MADV_HUGEPAGE under -std=c99 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

enum {
    WS_OK = 0,
    WS_HEAPSORT = 1,   /* std::sort would switch to heapsort: the caller asks torch.argsort */
    WS_TOO_MANY = 2,   /* the ties do not fit a 32-bit packed key: the caller's int64 path */
    WS_NOT_FINITE = 3, /* a key above `limit` (NaN): mergekit's argsort order is the caller's */
    WS_NO_MEMORY = 4,
    WS_BAD_ARGS = 5,
};

static int floor_log2(int64_t n) {
    int r = 0;
    while (n > 1) {
        n >>= 1;
        ++r;
    }
    return r;
}

#ifdef __AVX2__
#include <immintrin.h>
/* ws_lut[m]: the positions of the set bits of m, in order (8 stops at most per 8 keys). With
 * AVX2 a block's stops are found 8 keys at a time: compare, take the mask, store its row. */
static uint16_t ws_lut[256][8];

__attribute__((constructor)) static void ws_lut_init(void) {
    for (int m = 0; m < 256; ++m) {
        int c = 0;
        for (int b = 0; b < 8; ++b)
            if (m >> b & 1) ws_lut[m][c++] = (uint16_t)b;
    }
}
#endif

#define WS_BLOCK 2048 /* at most 65536: offsets are 16-bit */

/* Hoare's unguarded partition of a[first + 1, last) around the pivot a[first] (keys in
 * [lo, hi]), as libstdc++ does it, and the cut it returns; -1 if a scan would run off the
 * segment (it cannot, after the median of three).
 *
 * The scans stop at the same places as the plain loop (left: the first key <= the pivot,
 * right: the first key >= it) and the m-th left stop is swapped with the m-th right stop
 * for as long as they have not crossed; that pairing only depends on the keys as they were
 * before the partition, because a swapped position is only ever reached again by the other
 * scan once the two have crossed. So the stops are found a block at a time without
 * branches (BlockQuicksort, Edelkamp and Weiss 2016), which is what makes this fast: the
 * plain loop mispredicts a branch on about every other element of random keys. Where the
 * scans cross, the plain loop's cut is the next left stop, or the last swapped right
 * position if that comes first (it now holds a key <= the pivot). */
static int64_t ws_partition(int32_t *a, int64_t first, int64_t last, int32_t lo, int32_t hi) {
    /* offsets of stops from lbase / rbase (8 spare: the vector loop stores 8 at a time) */
    uint16_t lbuf[WS_BLOCK + 8], rbuf[WS_BLOCK + 8];
#ifdef __AVX2__
    const __m256i vhi = _mm256_set1_epi32(hi), vlo = _mm256_set1_epi32(lo);
    const __m256i reverse = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
#endif
    int64_t lnext = first + 1, rnext = last - 1; /* the next positions each scan reads */
    int64_t lbase = 0, rbase = 0;
    int nl = 0, il = 0, nr = 0, ir = 0;
    int64_t last_right = -1; /* the last swapped right position */
    for (;;) {
        if (il == nl) { /* refill the left stops */
            il = nl = 0;
            while (nl == 0) {
                /* past the last swapped right position (read before its swap, it was no
                 * stop): the plain loop stops there */
                if (last_right >= 0 && lnext > last_right) return last_right;
                if (lnext >= last) return -1;
                int64_t end = lnext + WS_BLOCK < last ? lnext + WS_BLOCK : last;
                lbase = lnext;
                const int32_t *src = a + lbase;
                int count = (int)(end - lnext), p = 0;
#ifdef __AVX2__
                for (; p + 8 <= count; p += 8) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(src + p));
                    unsigned m = ~(unsigned)_mm256_movemask_ps(
                                     _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, vhi))) & 0xFFu;
                    __m128i at = _mm_add_epi16(_mm_loadu_si128((const __m128i *)ws_lut[m]),
                                               _mm_set1_epi16((short)p));
                    _mm_storeu_si128((__m128i *)(lbuf + nl), at);
                    nl += __builtin_popcount(m);
                }
#endif
                for (; p < count; ++p) {
                    lbuf[nl] = (uint16_t)p;
                    nl += src[p] <= hi;
                }
                lnext = end;
            }
        }
        if (ir == nr) { /* refill the right stops (a[first], the pivot, stops the scan) */
            ir = nr = 0;
            while (nr == 0) {
                if (rnext < first) return -1;
                int64_t end = rnext - WS_BLOCK > first - 1 ? rnext - WS_BLOCK : first - 1;
                rbase = rnext;
                const int32_t *src = a + rbase;
                int count = (int)(rnext - end), p = 0;
#ifdef __AVX2__
                for (; p + 8 <= count; p += 8) { /* positions rbase - p - 7 .. rbase - p */
                    __m256i v = _mm256_permutevar8x32_epi32(
                        _mm256_loadu_si256((const __m256i *)(src - p - 7)), reverse);
                    unsigned m = ~(unsigned)_mm256_movemask_ps(
                                     _mm256_castsi256_ps(_mm256_cmpgt_epi32(vlo, v))) & 0xFFu;
                    __m128i at = _mm_add_epi16(_mm_loadu_si128((const __m128i *)ws_lut[m]),
                                               _mm_set1_epi16((short)p));
                    _mm_storeu_si128((__m128i *)(rbuf + nr), at);
                    nr += __builtin_popcount(m);
                }
#endif
                for (; p < count; ++p) {
                    rbuf[nr] = (uint16_t)p;
                    nr += src[-p] >= lo;
                }
                rnext = end;
            }
        }
        /* swap stop pairs until they cross: then the cut is the left stop, or the last
         * swapped right position if that comes first (it now holds a key <= the pivot) */
        int pairs = nl - il < nr - ir ? nl - il : nr - ir;
        for (int c = 0; c < pairs; ++c) {
            int64_t l = lbase + lbuf[il + c], r = rbase - rbuf[ir + c];
            if (l >= r) return last_right >= 0 && l > last_right ? last_right : l;
            int32_t swap = a[l];
            a[l] = a[r];
            a[r] = swap;
            last_right = r;
        }
        il += pairs;
        ir += pairs;
    }
}

/* The selection once the keys are counted. key: (n,) 16-bit keys; it may be the first half
 * of packed's memory (the packing runs from the last element down, so it never overwrites a
 * key it has yet to read). counts: the number of each key in its first 65536 entries (the
 * block is freed here). */
static int topk_counted(const uint16_t *key, int64_t n, int64_t k, uint16_t limit,
                        int64_t *counts, uint8_t *keep, int32_t *packed) {
    int top = 65535;
    while (counts[top] == 0) --top;
    if (top > limit) {
        free(counts);
        return WS_NOT_FINITE;
    }
    /* t: the k-th largest key; every key > t is kept, every key < t is not. */
    int64_t above = 0;
    int t = top;
    for (;; --t) {
        above += counts[t];
        if (above >= k) break;
    }
    int64_t count_t = counts[t];
    int64_t unit = count_t + 1; /* packed = order * unit + tag, tags 1..count_t on keys == t */
    int32_t *rank = NULL;       /* dense ranks where the keys themselves do not fit */
    int64_t tr = t;
    if ((int64_t)(top + 1) * unit >= ((int64_t)1 << 31)) {
        int64_t distinct = 0;
        for (int v = 0; v <= top; ++v) distinct += counts[v] > 0;
        if (distinct * unit >= ((int64_t)1 << 31)) {
            free(counts);
            return WS_TOO_MANY;
        }
        rank = malloc(sizeof(int32_t) * (size_t)(top + 1));
        if (!rank) {
            free(counts);
            return WS_NO_MEMORY;
        }
        int32_t r = 0;
        for (int v = 0; v <= top; ++v) {
            rank[v] = r;
            r += counts[v] > 0;
        }
        tr = rank[t];
    }
    free(counts);
    int64_t *tpos = malloc(sizeof(int64_t) * (size_t)(count_t > 0 ? count_t : 1));
    if (!tpos) {
        free(rank);
        return WS_NO_MEMORY;
    }
    /* Any one-to-one tagging of the keys equal to t will do: std::sort compares keys only.
     * keep gets bit i % 8 of byte i / 8 set for key > t (the tagged ones are added below). */
    int64_t tag = 0;
    for (int64_t byte = (n - 1) >> 3; byte >= 0; --byte) {
        unsigned bits = 0;
        int64_t end = byte * 8 + 8 < n ? byte * 8 + 8 : n;
        for (int64_t i = end - 1; i >= byte * 8; --i) {
            int v = key[i];
            int64_t p = (rank ? rank[v] : v) * unit;
            bits |= (unsigned)(v > t) << (i & 7);
            if (v == t) {
                tpos[tag] = i;
                p += ++tag;
            }
            packed[i] = (int32_t)p;
        }
        keep[byte] = (uint8_t)bits;
    }
    free(rank);

    const int64_t t_lo = tr * unit, t_hi = tr * unit + unit - 1;
#define WS_RECORD(x)                                             \
    do {                                                         \
        int32_t x_ = (x);                                        \
        if (x_ > t_lo && x_ <= t_hi) {                           \
            int64_t at_ = tpos[x_ - t_lo - 1];                   \
            keep[at_ >> 3] |= (uint8_t)(1u << (at_ & 7));        \
        }                                                        \
    } while (0)

    int rc = WS_OK;
    int64_t first = 0, last = n;
    int depth = 2 * floor_log2(n);
    while (last - first > 16) {
        if (depth == 0) {
            rc = WS_HEAPSORT;
            goto done;
        }
        --depth;
        /* std::__move_median_to_first(first, first + 1, mid, last - 1), comp = greater */
        int64_t a = first + 1, b = first + (last - first) / 2, c = last - 1, m;
        int64_t ka = packed[a] / unit, kb = packed[b] / unit, kc = packed[c] / unit;
        if (ka > kb) {
            m = kb > kc ? b : (ka > kc ? c : a);
        } else if (ka > kc) {
            m = a;
        } else if (kb > kc) {
            m = c;
        } else {
            m = b;
        }
        int32_t swap = packed[first];
        packed[first] = packed[m];
        packed[m] = swap;
        /* std::__unguarded_partition(first + 1, last, first): the left scan passes keys
         * greater than the pivot, the right scan keys less than it. */
        int64_t pivot = packed[first] / unit;
        int64_t cut = ws_partition(packed, first, last, (int32_t)(pivot * unit),
                                   (int32_t)(pivot * unit + unit - 1));
        if (cut < 0) { /* the median of three guarantees a stop: never reached */
            rc = WS_HEAPSORT;
            goto done;
        }
        if (k < cut) { /* position k is left of the cut: the right part is not kept */
            last = cut;
            continue;
        }
        if (pivot == tr) /* the left part is kept whole; it holds keys == t only then */
            for (int64_t x = first; x < cut; ++x) WS_RECORD(packed[x]);
        first = cut;
        if (cut == k) last = cut;
    }
    if (last > first) {
        /* the final insertion sort (stable): the first k - first of the segment by key */
        int32_t seg[16];
        int64_t size = last - first;
        for (int64_t x = 0; x < size; ++x) {
            int32_t v = packed[first + x];
            int64_t y = x;
            while (y > 0 && v / unit > seg[y - 1] / unit) {
                seg[y] = seg[y - 1];
                --y;
            }
            seg[y] = v;
        }
        for (int64_t x = 0; x < k - first; ++x) WS_RECORD(seg[x]);
    }
done:
#undef WS_RECORD
    free(tpos);
    return rc;
}

/* Count the keys, then select (topk_counted). Two count tables, for alternate elements, so
 * that runs of equal keys do not wait on one counter; they are added up before use. */
static int topk_keys(const uint16_t *key, int64_t n, int64_t k, uint16_t limit,
                     uint8_t *keep, int32_t *packed) {
    int64_t *counts = calloc(2 * 65536, sizeof(int64_t));
    if (!counts) return WS_NO_MEMORY;
    int64_t *odd = counts + 65536;
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
        counts[key[i]]++;
        odd[key[i + 1]]++;
    }
    if (i < n) counts[key[i]]++;
    for (int v = 0; v < 65536; ++v) counts[v] += odd[v];
    return topk_counted(key, n, k, limit, counts, keep, packed);
}

/* The packed keys' scratch, 4 bytes an element: mapped for the call and returned after.
 * Fresh memory costs a page fault per page touched; asking for huge pages (where the
 * kernel grants them on request) makes that one fault per 2 MiB. */
static int32_t *scratch_new(int64_t n, size_t *bytes) {
    *bytes = (size_t)n * sizeof(int32_t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    void *p = mmap(NULL, *bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    madvise(p, *bytes, MADV_HUGEPAGE);
    return p;
#else
    return malloc(*bytes);
#endif
}

static void scratch_free(int32_t *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    munmap(p, bytes);
#else
    (void)bytes;
    free(p);
#endif
}

/* key: (n,) |x| of a bf16/fp16 tensor read as unsigned 16-bit ints (sign bit clear), which
 * order exactly like the float32 values mergekit sorts. 0 < k < n < 2^31. keep: ((n + 7) / 8,)
 * bytes, bit i % 8 of byte i / 8 set for the k kept elements, clear elsewhere. limit: the
 * largest finite key (0x7F80 bf16 +inf, 0x7C00 fp16 +inf). */
int ws_topk_keep_u16(const uint16_t *key, int64_t n, int64_t k, uint16_t limit,
                     uint8_t *keep) {
    if (n <= 0 || k <= 0 || k >= n) return WS_BAD_ARGS;
    if (n >= ((int64_t)1 << 31)) return WS_TOO_MANY;
    size_t bytes;
    int32_t *packed = scratch_new(n, &bytes);
    if (!packed) return WS_NO_MEMORY;
    int rc = topk_keys(key, n, k, limit, keep, packed);
    scratch_free(packed, bytes);
    return rc;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float -> bf16, rounding to nearest even, NaN to 0x7FC0: c10::BFloat16's conversion. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* TIES' trim of one bf16 task vector without making it first: delta = x - base as torch's
 * bf16 `sub` rounds it (float32 difference, rounded to nearest even), and its magnitude's
 * bits are the keys. x, base: (n,) bf16 bits. keep: as ws_topk_keep_u16. The keys are made
 * in the first half of the packed keys' memory. A NaN delta gives WS_NOT_FINITE. */
int ws_ties_keep_bf16(const uint16_t *x, const uint16_t *base, int64_t n, int64_t k,
                      uint8_t *keep) {
    if (n <= 0 || k <= 0 || k >= n) return WS_BAD_ARGS;
    if (n >= ((int64_t)1 << 31)) return WS_TOO_MANY;
    size_t bytes;
    int32_t *packed = scratch_new(n, &bytes);
    if (!packed) return WS_NO_MEMORY;
    uint16_t *key = (uint16_t *)packed;
    for (int64_t i = 0; i < n; ++i)
        key[i] = float_to_bf16(bf16_to_float(x[i]) - bf16_to_float(base[i])) & 0x7FFFu;
    int rc = topk_keys(key, n, k, 0x7F80, keep, packed);
    scratch_free(packed, bytes);
    return rc;
}

/* Map the pages of [p, p + bytes) of a file mapping in one call (MADV_POPULATE_READ, Linux
 * 5.14+) rather than one page fault per 16 pages as the tensor is first read: 0, or the
 * errno (EINVAL on older kernels; then the faults happen as before). */
int ws_populate(const void *p, int64_t bytes) {
#if defined(__linux__)
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
    if (bytes <= 0) return 0;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)p & ~(page - 1);
    uintptr_t end = (uintptr_t)p + (uintptr_t)bytes;
    return madvise((void *)start, end - start, MADV_POPULATE_READ) == 0 ? 0 : errno;
#else
    (void)p;
    (void)bytes;
    return -1;
#endif
}
