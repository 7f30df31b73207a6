/* Run maps of panoptic images (see dearli.evaluation.panoptic_io.PanopticRuns) in C.
 *
 * png_runs: the runs of equal colours of an 8-bit RGB or RGBA PNG, straight from its inflated image data
 * (H scanlines of 1 filter-type byte and W·bpp filtered bytes), without the GIL. Each row is unfiltered
 * (None, Sub, Up, Average, Paeth, exactly as the PNG specification defines them) into one of two row
 * buffers, and the pixels where the colour (alpha ignored) differs from the previous pixel in row-major
 * order start runs. Panoptic maps are piecewise constant, so filtered rows are mostly zero bytes, and a
 * zero span of the residual makes the row either repeat the pixel before the span (Sub, some Paeth) or
 * copy the row above (Up, other Paeth). Such spans are filled by block copies and remembered: a repeat
 * span starts no run, a copy span starts runs where the row above does (read back from the runs found
 * so far). Only the remaining pixels are compared one by one.
 *
 * pair_histogram: pixel counts of (slot, slot) pairs of two run maps of one image: run ids are looked up
 * in the segment id tables, then the run starts of both maps are merged. A few thousand runs, so it keeps
 * the GIL (releasing it would cost more than the work).
 *
 * read_file: a small file's bytes with one release of the GIL (the PNG files, before png_runs).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t *starts; /* first pixel of each run, increasing, starts[0] == 0 */
    uint32_t *ids;   /* R + 256·G + 65536·B of each run */
    Py_ssize_t n, cap;
} Runs;

/* Bytes [start, end) of a row that copy the row above (copy = 1) or repeat the bytes bpp before them. */
typedef struct {
    size_t start, end;
    int copy;
} Span;

typedef struct {
    Span *items; /* room for one span per two bytes of a row: each span is followed by a computed byte */
    size_t n;
} Spans;

/* Appends a run; 0 on success, -1 when out of memory (no GIL needed). */
static int runs_push(Runs *r, int64_t start, uint32_t id) {
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap ? 2 * r->cap : 1024;
        int64_t *starts = PyMem_RawRealloc(r->starts, (size_t)cap * sizeof(int64_t));
        if (starts == NULL) return -1;
        r->starts = starts;
        uint32_t *ids = PyMem_RawRealloc(r->ids, (size_t)cap * sizeof(uint32_t));
        if (ids == NULL) return -1;
        r->ids = ids;
        r->cap = cap;
    }
    r->starts[r->n] = start;
    r->ids[r->n] = id;
    r->n++;
    return 0;
}

/* Records a span that covers at least one whole pixel (shorter ones cannot save a comparison). */
static inline void add_span(Spans *spans, size_t start, size_t end, int copy, size_t bpp) {
    if (end >= start + bpp) spans->items[spans->n++] = (Span){start, end, copy};
}

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static const uint8_t ALL_BYTES[16] = {255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255};
static const uint8_t RGB_BYTES[16] = {255, 255, 255, 0, 255, 255, 255, 0, 255, 255, 255, 0, 255, 255, 255, 0};

/* Spans: zero_span(p, n) is the number of leading zero bytes of p[0..n), same_span(p, q, n, mask) the number
 * of leading bytes k with (p[k] ^ q[k]) & mask[k % 16] == 0. Blocks of 64, then 16 bytes (SSE2 where the
 * compiler has it, else 8-byte words), then single bytes for the tail. */
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>

static inline __m128i load128(const uint8_t *p) {
    return _mm_loadu_si128((const __m128i *)p);
}

/* Bit k set where byte k of v is nonzero. */
static inline unsigned nonzero_bytes(__m128i v) {
    return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_setzero_si128())) ^ 0xFFFFu;
}

static inline unsigned first_bit(unsigned m) { /* m != 0 */
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctz(m);
#else
    unsigned k = 0;
    for (; !(m & 1u); m >>= 1) k++;
    return k;
#endif
}

static size_t zero_span(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i + 64 <= n && !nonzero_bytes(_mm_or_si128(_mm_or_si128(load128(p + i), load128(p + i + 16)),
                                                      _mm_or_si128(load128(p + i + 32), load128(p + i + 48)))))
        i += 64;
    for (; i + 16 <= n; i += 16) {
        unsigned m = nonzero_bytes(load128(p + i));
        if (m) return i + first_bit(m);
    }
    while (i < n && p[i] == 0) i++;
    return i;
}

static inline __m128i xor128(const uint8_t *p, const uint8_t *q) {
    return _mm_xor_si128(load128(p), load128(q));
}

static size_t same_span(const uint8_t *p, const uint8_t *q, size_t n, const uint8_t mask[16]) {
    const __m128i m = load128(mask);
    size_t i = 0;
    while (i + 64 <= n && !nonzero_bytes(_mm_and_si128(m, _mm_or_si128(_mm_or_si128(xor128(p + i, q + i),
                                                                                     xor128(p + i + 16, q + i + 16)),
                                                                        _mm_or_si128(xor128(p + i + 32, q + i + 32),
                                                                                     xor128(p + i + 48, q + i + 48))))))
        i += 64;
    for (; i + 16 <= n; i += 16) {
        unsigned d = nonzero_bytes(_mm_and_si128(m, xor128(p + i, q + i)));
        if (d) return i + first_bit(d);
    }
    while (i < n && ((p[i] ^ q[i]) & mask[i % 16]) == 0) i++;
    return i;
}
#else
static size_t zero_span(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i + 8 <= n && load64(p + i) == 0) i += 8;
    while (i < n && p[i] == 0) i++;
    return i;
}

static size_t same_span(const uint8_t *p, const uint8_t *q, size_t n, const uint8_t mask[16]) {
    const uint64_t m0 = load64(mask), m1 = load64(mask + 8);
    size_t i = 0;
    while (i + 16 <= n && (((load64(p + i) ^ load64(q + i)) & m0) | ((load64(p + i + 8) ^ load64(q + i + 8)) & m1)) == 0)
        i += 16;
    while (i < n && ((p[i] ^ q[i]) & mask[i % 16]) == 0) i++;
    return i;
}
#endif

/* Number of leading bytes k of p[0..n) with p[k] == p[k - bpp] (p[-bpp..-1] must be readable). */
static inline size_t repeat_span(const uint8_t *p, size_t n, size_t bpp) {
    return same_span(p, p - bpp, n, ALL_BYTES);
}

/* Bytes a row buffer has past its end, for the block copies of repeat_fill. */
#define ROW_SLACK 48

/* cur[k] = cur[k - bpp] for k in [s, e): the first 48 bytes (a multiple of 3 and 4) from the bytes
 * before s held in registers, then copies of those 48. Writes up to ROW_SLACK - 1 bytes past e: row
 * buffers have that slack, and bytes within the row past e are computed afterwards anyway. */
static void repeat_fill(uint8_t *cur, size_t s, size_t e, size_t bpp) {
    size_t head = e - s < 48 ? e : s + 48, k = s;
    if (bpp == 3) {
        const uint8_t p0 = cur[s - 3], p1 = cur[s - 2], p2 = cur[s - 1];
        for (; k < head; k += 3) {
            cur[k] = p0;
            cur[k + 1] = p1;
            cur[k + 2] = p2;
        }
    } else {
        const uint8_t p0 = cur[s - 4], p1 = cur[s - 3], p2 = cur[s - 2], p3 = cur[s - 1];
        for (; k < head; k += 4) {
            cur[k] = p0;
            cur[k + 1] = p1;
            cur[k + 2] = p2;
            cur[k + 3] = p3;
        }
    }
    for (size_t pos = head; pos < e; pos += 48) memcpy(cur + pos, cur + s, 48);
}

static inline uint8_t paeth(uint8_t a, uint8_t b, uint8_t c) {
    int p = (int)a + b - c;
    int pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

static inline int same_pixel(const uint8_t *p, const uint8_t *q, size_t bpp) {
    return p[0] == q[0] && p[1] == q[1] && p[2] == q[2] && (bpp == 3 || p[3] == q[3]);
}

static inline size_t min_size(size_t a, size_t b) {
    return a < b ? a : b;
}

/* Sub: cur[k] = line[k] + cur[k - bpp]; a zero span of the residual repeats the bytes before it. */
static void unfilter_sub(uint8_t *cur, const uint8_t *line, size_t n, size_t bpp, Spans *spans) {
    size_t i = 0;
    while (i < n) {
        size_t z = zero_span(line + i, n - i);
        repeat_fill(cur, i, i + z, bpp);
        add_span(spans, i, i + z, 0, bpp);
        i += z;
        for (size_t end = min_size(i + bpp, n); i < end; i++) cur[i] = (uint8_t)(line[i] + cur[i - bpp]);
    }
}

/* Up: cur[k] = line[k] + prev[k]; a zero span of the residual copies the row above. */
static void unfilter_up(uint8_t *cur, const uint8_t *prev, const uint8_t *line, size_t n, size_t bpp, Spans *spans) {
    size_t i = 0;
    while (i < n) {
        size_t z = zero_span(line + i, n - i);
        memcpy(cur + i, prev + i, z);
        add_span(spans, i, i + z, 1, bpp);
        i += z;
        for (size_t end = min_size(i + 16, n); i < end; i++) cur[i] = (uint8_t)(line[i] + prev[i]);
    }
}

/* Paeth, with predictor paeth(a, b, c) of a = cur[k - bpp], b = prev[k], c = prev[k - bpp]. Over a zero
 * span of the residual: where the bpp bytes before it equal those above (a == c), the predictor is b at
 * every byte, so the span copies the row above; where the row above repeats its bytes (b == c), it is a. */
static void unfilter_paeth(uint8_t *cur, const uint8_t *prev, const uint8_t *line, size_t n, size_t bpp,
                           Spans *spans) {
    size_t i = 0;
    while (i < n) {
        size_t z = zero_span(line + i, n - i);
        if (z && same_pixel(cur + i - bpp, prev + i - bpp, bpp)) {
            memcpy(cur + i, prev + i, z);
            add_span(spans, i, i + z, 1, bpp);
            i += z;
        } else if (z) {
            size_t same = repeat_span(prev + i, z, bpp);
            repeat_fill(cur, i, i + same, bpp);
            add_span(spans, i, i + same, 0, bpp);
            i += same;
        }
        for (size_t end = min_size(i + bpp, n); i < end; i++)
            cur[i] = (uint8_t)(line[i] + paeth(cur[i - bpp], prev[i], prev[i - bpp]));
    }
}

/* One scanline into cur (cur[-bpp..-1] and prev[-bpp..-1] are zero), recording its spans; -1 for an
 * unknown filter type. */
static int unfilter_row(uint8_t *cur, const uint8_t *prev, const uint8_t *line, size_t n, size_t bpp,
                        Spans *spans) {
    spans->n = 0;
    switch (line[-1]) {
    case 0:
        memcpy(cur, line, n);
        return 0;
    case 1:
        unfilter_sub(cur, line, n, bpp, spans);
        return 0;
    case 2:
        unfilter_up(cur, prev, line, n, bpp, spans);
        return 0;
    case 3:
        for (size_t i = 0; i < n; i++) cur[i] = (uint8_t)(line[i] + ((cur[i - bpp] + prev[i]) >> 1));
        return 0;
    case 4:
        unfilter_paeth(cur, prev, line, n, bpp, spans);
        return 0;
    default:
        return -1;
    }
}

static inline uint32_t pixel_id(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
}

/* Byte offset of the first pixel at or after byte i (a pixel boundary, i >= bpp) whose colour differs
 * from the pixel before it, or n (alpha bytes are masked out for bpp 4: i is then a multiple of 4). */
static inline size_t next_change(const uint8_t *row, size_t i, size_t n, size_t bpp) {
    size_t k = i + same_span(row + i, row + i - bpp, n - i, bpp == 4 ? RGB_BYTES : ALL_BYTES);
    return k < n ? k - k % bpp : n;
}

/* Appends the runs starting at pixels [x0, x1) of a row (x0 >= 1), found by comparing pixels. */
static int compare_pixels(Runs *r, const uint8_t *row, size_t x0, size_t x1, size_t bpp, int64_t base) {
    size_t n = x1 * bpp;
    for (size_t i = next_change(row, x0 * bpp, n, bpp); i < n; i = next_change(row, i + bpp, n, bpp)) {
        if (runs_push(r, base + (int64_t)(i / bpp), pixel_id(row + i)) < 0) return -1;
    }
    return 0;
}

/* Appends the runs starting in the row at pixel `base` (runs [above, r->n) are those of the row above);
 * *last is the colour before the row. Whole pixels of a repeat span start no run; those of a copy span,
 * but its first, start one where the row above does. */
static int row_runs(Runs *r, const uint8_t *row, size_t width, size_t bpp, int64_t base, Py_ssize_t above,
                    const Spans *spans, uint32_t *last) {
    Py_ssize_t above_end = r->n;
    uint32_t id = pixel_id(row);
    if (id != *last && runs_push(r, base, id) < 0) return -1;
    size_t x = 1; /* pixels before x are done */
    for (size_t k = 0; k < spans->n; k++) {
        const Span *sp = &spans->items[k];
        size_t xs = (sp->start + bpp - 1) / bpp + (size_t)sp->copy, xe = sp->end / bpp;
        if (xs < x) xs = x;
        if (xs >= xe) continue;
        if (compare_pixels(r, row, x, xs, bpp, base) < 0) return -1;
        for (; sp->copy && above < above_end && r->starts[above] < base - (int64_t)width + (int64_t)xe; above++) {
            int64_t xa = r->starts[above] - (base - (int64_t)width);
            if (xa >= (int64_t)xs && runs_push(r, base + xa, r->ids[above]) < 0) return -1;
        }
        x = xe;
    }
    if (compare_pixels(r, row, x, width, bpp, base) < 0) return -1;
    *last = pixel_id(row + (width - 1) * bpp);
    return 0;
}

/* Unfilters and scans every row. Returns 0, -1 (out of memory) or 1 + the row with a bad filter type. */
static Py_ssize_t decode_runs(Runs *r, const uint8_t *raw, size_t width, size_t height, size_t bpp) {
    size_t n = width * bpp;
    uint8_t *buf = PyMem_RawCalloc(2 * (bpp + n + ROW_SLACK), 1);
    Spans spans = {PyMem_RawMalloc((n / 2 + 1) * sizeof(Span)), 0};
    if (buf == NULL || spans.items == NULL) {
        PyMem_RawFree(spans.items);
        PyMem_RawFree(buf);
        return -1;
    }
    Py_ssize_t status = 0, above = 0;
    uint8_t *prev = buf + bpp, *cur = buf + n + ROW_SLACK + 2 * bpp;
    uint32_t last = UINT32_MAX; /* no colour: the first pixel always starts a run */
    for (size_t y = 0; y < height && status == 0; y++) {
        const uint8_t *line = raw + y * (n + 1) + 1;
        Py_ssize_t row_start = r->n;
        if (unfilter_row(cur, prev, line, n, bpp, &spans) < 0) {
            status = 1 + (Py_ssize_t)y;
        } else if (row_runs(r, cur, width, bpp, (int64_t)(y * width), above, &spans, &last) < 0) {
            status = -1;
        }
        above = row_start;
        uint8_t *t = prev;
        prev = cur;
        cur = t;
    }
    PyMem_RawFree(spans.items);
    PyMem_RawFree(buf);
    return status;
}

static PyObject *runs_result(Runs *r) {
    PyObject *starts = PyByteArray_FromStringAndSize((const char *)r->starts, r->n * (Py_ssize_t)sizeof(int64_t));
    PyObject *ids = PyByteArray_FromStringAndSize((const char *)r->ids, r->n * (Py_ssize_t)sizeof(uint32_t));
    if (starts == NULL || ids == NULL) {
        Py_XDECREF(starts);
        Py_XDECREF(ids);
        return NULL;
    }
    return Py_BuildValue("(NN)", starts, ids);
}

PyDoc_STRVAR(png_runs_doc,
"png_runs(raw, width, height, bpp) -> (starts, ids)\n\n"
"Runs of equal colours of an 8-bit RGB (bpp 3) or RGBA (bpp 4) PNG, from its inflated image data\n"
"(height scanlines of 1 filter-type byte and width*bpp bytes). Returns two bytearrays: M native int64\n"
"run starts (pixel index in row-major order, increasing, the first 0) and M native uint32 run colours\n"
"R + 256*G + 65536*B (alpha ignored). Raises ValueError on a wrong data length or filter type.");

static PyObject *png_runs(PyObject *self, PyObject *args) {
    Py_buffer raw;
    Py_ssize_t width, height, bpp;
    if (!PyArg_ParseTuple(args, "y*nnn", &raw, &width, &height, &bpp)) return NULL;
    PyObject *result = NULL;
    Runs r = {NULL, NULL, 0, 0};
    Py_ssize_t status = 0;
    if ((bpp != 3 && bpp != 4) || width < 1 || height < 1 || width > PY_SSIZE_T_MAX / 2 / bpp / height) {
        PyErr_SetString(PyExc_ValueError, "width and height must be positive and bpp 3 or 4");
        goto done;
    }
    if (raw.len != height * (width * bpp + 1)) {
        PyErr_Format(PyExc_ValueError, "image data has %zd bytes, expected %zd", raw.len, height * (width * bpp + 1));
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = decode_runs(&r, raw.buf, (size_t)width, (size_t)height, (size_t)bpp);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
    } else if (status > 0) {
        const uint8_t *row = (const uint8_t *)raw.buf + (status - 1) * (width * bpp + 1);
        PyErr_Format(PyExc_ValueError, "unknown filter type %d in row %zd", (int)row[0], status - 1);
    } else {
        result = runs_result(&r);
    }
done:
    PyMem_RawFree(r.starts);
    PyMem_RawFree(r.ids);
    PyBuffer_Release(&raw);
    return result;
}

/* Checks that starts (m entries) begin at 0, increase and stay below size. */
static int check_starts(const int64_t *starts, Py_ssize_t m, int64_t size) {
    if (m < 1 || starts[0] != 0 || starts[m - 1] >= size) return -1;
    for (Py_ssize_t i = 1; i < m; i++) {
        if (starts[i] <= starts[i - 1]) return -1;
    }
    return 0;
}

/* Position of the first of the n increasing entries of t that is >= x (n when none is), without branches. */
static Py_ssize_t lower_bound(const uint32_t *t, Py_ssize_t n, uint32_t x) {
    if (n == 0) return 0;
    const uint32_t *base = t;
    while (n > 1) {
        Py_ssize_t half = n / 2;
        base = base[half] < x ? base + half : base;
        n -= half;
    }
    return (base - t) + (*base < x);
}

/* slots[i] = position of ids[i] in the n increasing ids of table, or n when absent; returns how many are
 * absent. An image has a few dozen ids over thousands of runs: found slots are kept in a small hash table. */
static Py_ssize_t lookup(const uint32_t *ids, Py_ssize_t m, const uint32_t *table, Py_ssize_t n, int64_t *slots) {
    uint32_t seen[256]; /* ids are below 2**24: UINT32_MAX marks an empty entry */
    int64_t seen_slot[256];
    memset(seen, 0xFF, sizeof seen);
    Py_ssize_t absent = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        uint32_t id = ids[i], h = (id * 2654435761u) >> 24;
        if (seen[h] != id) {
            Py_ssize_t k = lower_bound(table, n, id);
            seen[h] = id;
            seen_slot[h] = k < n && table[k] == id ? k : n;
        }
        slots[i] = seen_slot[h];
        absent += slots[i] == n;
    }
    return absent;
}

/* hist[sa * cols + sb] += pixels of each joint run, walking both run maps in step. */
static void merge_counts(int64_t *hist, const int64_t *sa, const int64_t *ka, Py_ssize_t ma, const int64_t *sb,
                         const int64_t *kb, Py_ssize_t mb, int64_t size, int64_t cols) {
    Py_ssize_t i = 0, j = 0;
    int64_t pos = 0, end_a = ma > 1 ? sa[1] : size, end_b = mb > 1 ? sb[1] : size;
    while (pos < size) {
        int64_t next = end_a < end_b ? end_a : end_b;
        hist[ka[i] * cols + kb[j]] += next - pos;
        pos = next;
        if (next == end_a) {
            i++;
            end_a = i + 1 < ma ? sa[i + 1] : size;
        }
        if (next == end_b) {
            j++;
            end_b = j + 1 < mb ? sb[j + 1] : size;
        }
    }
}

/* The histogram of two checked run maps given by their buffers (starts, ids, table for a, then for b). */
static PyObject *histogram(Py_buffer *b, int64_t size) {
    Py_ssize_t ma = b[0].len / 8, mb = b[3].len / 8, rows = b[2].len / 4 + 1, cols = b[5].len / 4 + 1;
    int64_t *slots = PyMem_Malloc((size_t)(ma + mb) * sizeof(int64_t));
    PyObject *counts = PyByteArray_FromStringAndSize(NULL, rows * cols * 8);
    if (slots == NULL || counts == NULL) {
        PyMem_Free(slots);
        Py_XDECREF(counts);
        return PyErr_NoMemory();
    }
    lookup(b[1].buf, ma, b[2].buf, rows - 1, slots);
    Py_ssize_t absent = lookup(b[4].buf, mb, b[5].buf, cols - 1, slots + ma);
    int64_t *hist = (int64_t *)PyByteArray_AS_STRING(counts);
    memset(hist, 0, (size_t)(rows * cols) * 8);
    merge_counts(hist, b[0].buf, slots, ma, b[3].buf, slots + ma, mb, size, cols);
    PyMem_Free(slots);
    return Py_BuildValue("(Nn)", counts, absent);
}

/* Increasing entries of a table of uint32 ids. */
static int check_table(const Py_buffer *t) {
    const uint32_t *ids = t->buf;
    for (Py_ssize_t i = 1; i < t->len / 4; i++) {
        if (ids[i] <= ids[i - 1]) return -1;
    }
    return t->len % 4 == 0 && t->len / 4 < 1 << 24 ? 0 : -1;
}

PyDoc_STRVAR(pair_histogram_doc,
"pair_histogram(starts_a, ids_a, table_a, starts_b, ids_b, table_b, size) -> (counts, absent_b)\n\n"
"Pixel counts of (slot of a, slot of b) pairs of two run maps of one image of size pixels. Each map is\n"
"given as M native int64 run starts (the first 0, increasing, below size), M native uint32 run ids and\n"
"a table of N increasing native uint32 ids: an id's slot is its position in the table, N for ids not in\n"
"it. Returns a bytearray of (N_a + 1)*(N_b + 1) native int64 counts, row-major, and the number of runs\n"
"of b whose id is not in table_b. Raises ValueError on inputs that break these rules.");

static PyObject *pair_histogram(PyObject *self, PyObject *args) {
    Py_buffer b[6];
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*n", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &size)) return NULL;
    PyObject *result = NULL;
    int ok = 1;
    for (int k = 0; k < 6; k += 3) {
        Py_ssize_t m = b[k].len / 8;
        ok = ok && b[k].len % 8 == 0 && b[k + 1].len == 4 * m && check_starts(b[k].buf, m, size) == 0;
        ok = ok && check_table(&b[k + 2]) == 0;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "pair_histogram: malformed run maps or id tables");
    } else {
        result = histogram(b, size);
    }
    for (int k = 0; k < 6; k++) PyBuffer_Release(&b[k]);
    return result;
}

/* The whole regular file at path into *buf (PyMem_RawMalloc'ed, *len bytes); 0 or an errno value. No GIL needed. */
static int slurp(const char *path, char **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return errno;
    struct stat st;
    int err = fstat(fileno(f), &st) != 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : !S_ISREG(st.st_mode) ? EINVAL : 0;
    if (!err && (*buf = PyMem_RawMalloc((size_t)st.st_size + 1)) == NULL) err = ENOMEM;
    if (!err && (*len = fread(*buf, 1, (size_t)st.st_size, f)) != (size_t)st.st_size) err = EIO;
    if (!err && fgetc(f) != EOF) err = EAGAIN; /* the file grew while it was read */
    fclose(f);
    return err;
}

PyDoc_STRVAR(read_file_doc,
"read_file(path) -> bytes\n\n"
"The contents of a file, opened, read and closed within one release of the GIL. Python's own file\n"
"reading releases it several times a file, and with worker threads each release can hand it to another\n"
"thread for far longer than reading a small file takes. Raises OSError.");

static PyObject *read_file(PyObject *self, PyObject *arg) {
    PyObject *path;
    if (!PyUnicode_FSConverter(arg, &path)) return NULL;
    char *buf = NULL;
    size_t len = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = slurp(PyBytes_AS_STRING(path), &buf, &len);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
    } else {
        result = PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
    }
    PyMem_RawFree(buf);
    Py_DECREF(path);
    return result;
}

static PyMethodDef methods[] = {
    {"png_runs", png_runs, METH_VARARGS, png_runs_doc},
    {"pair_histogram", pair_histogram, METH_VARARGS, pair_histogram_doc},
    {"read_file", read_file, METH_O, read_file_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_runs", "Run maps of panoptic images: from PNG scanlines, and pair counts of two maps.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__runs(void) {
    return PyModule_Create(&module);
}
