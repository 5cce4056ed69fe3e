/*
 * The common `POST /v2/query` read straight from a connection's bytes: the request head's framing
 * and a strict reader of the query's JSON body.
 *
 * The server (vibrato/server/protocol.py, fastpath.py) offers each read of an idle connection to
 * vb_httpq_head first. A head this reader takes is a strict subset of what aiohttp's parser takes:
 * RFC 9112 tokens, visible ASCII field values, at most VB_HTTPQ_MAX_HEAD bytes and
 * VB_HTTPQ_MAX_FIELDS fields, a Host field and no duplicate of a singleton field (aiohttp answers
 * 400 otherwise), so
 * framing it by its Content-Length gives the message boundaries aiohttp would find. Anything else
 * (a partial head, obs-fold, chunked bodies, 8-bit bytes, ...) returns 0 and the bytes go to aiohttp.
 *
 * vb_httpq_query_body reads the body of the common query and nothing else: an object with the
 * fields vector (exactly dim JSON numbers), k, ef, include_metadata, search_tier, filter (null, or
 * an object whose bytes it hands over for a full JSON parser and the schema), each at most once, no string escapes, no value the regular route would answer with an error.
 * It returns 0 for anything else, and the regular route then parses, validates and answers
 * (docs/SERVER.md, "Fast query path"). Components convert as the regular route converts them: a
 * JSON number to the nearest double, that double to float32 (an integer through int64).
 */
#pragma once

#include <float.h>
#include <locale.h>
#include <stdlib.h>

#include "common.h"

#define VB_HTTPQ_MAX_HEAD 8190  /* aiohttp's max_line_size and max_field_size */
#define VB_HTTPQ_MAX_FIELDS 128 /* aiohttp's max_headers */

enum {
    VB_HTTPQ_TIER_ACTIVE = 0,
    VB_HTTPQ_TIER_ARCHIVE = 1,
    VB_HTTPQ_TIER_ALL = 2,
};

typedef struct {
    /* head */
    size_t head_len;        /* through the blank line */
    int64_t content_length; /* -1: no Content-Length field */
    int is_query;           /* request line `POST /v2/query HTTP/1.1` */
    int plain;              /* no Expect or Content-Encoding field, and Connection (if any) exactly
                             * keep-alive (a head with Transfer-Encoding or Upgrade is refused) */
    int json;               /* one Content-Type field, application/json or application/...+json */
    int auth_count;
    size_t auth_off, auth_len; /* the first Authorization field's value */
    int rid_count;
    size_t rid_off, rid_len; /* the first x-request-id field's value */
    /* body */
    int64_t k, ef;
    int include_metadata;
    int tier;
    size_t filter_off, filter_len; /* a filter object's bytes in the body (filter_len 0: none or null) */
} vb_httpq_t;

static inline int vb_httpq_lower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* RFC 9110 tchar */
static inline int vb_httpq_tchar(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return 1;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-': case '.':
    case '^': case '_': case '`': case '|': case '~':
        return 1;
    default:
        return 0;
    }
}

/* Case-insensitive equality of [p, p+n) with a lower-case literal. */
static inline int vb_httpq_is(const unsigned char *p, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m) return 0;
    for (size_t i = 0; i < n; i++)
        if (vb_httpq_lower(p[i]) != (unsigned char)lit[i]) return 0;
    return 1;
}

static const char VB_HTTPQ_LINE[] = "POST /v2/query HTTP/1.1\r\n";

/* Fields that may appear once (aiohttp's singletons, plus the two the fast path reads). */
static const char *const VB_HTTPQ_SINGLETONS[] = {
    "content-length", "content-location", "content-range", "content-type", "etag", "host",
    "max-forwards", "server", "transfer-encoding", "user-agent", "x-request-id",
};
#define VB_HTTPQ_HOST 5 /* its index above */
#define VB_HTTPQ_N_SINGLETONS (sizeof(VB_HTTPQ_SINGLETONS) / sizeof(VB_HTTPQ_SINGLETONS[0]))

/* One field: name [p, p+nl), value [v, v+vl) (OWS trimmed). 0: the head is refused. */
static inline int vb_httpq_field(const unsigned char *buf, const unsigned char *p, size_t nl, const unsigned char *v,
                                 size_t vl, unsigned *seen, vb_httpq_t *r) {
    for (size_t i = 0; i < VB_HTTPQ_N_SINGLETONS; i++) {
        if (vb_httpq_is(p, nl, VB_HTTPQ_SINGLETONS[i])) {
            if (*seen & (1u << i)) return 0;
            *seen |= 1u << i;
            break;
        }
    }
    if (vb_httpq_is(p, nl, "content-length")) {
        if (vl == 0 || vl > 15) return 0;
        int64_t n = 0;
        for (size_t i = 0; i < vl; i++) {
            if (v[i] < '0' || v[i] > '9') return 0;
            n = n * 10 + (v[i] - '0');
        }
        r->content_length = n;
    } else if (vb_httpq_is(p, nl, "content-type")) {
        size_t e = 0;
        while (e < vl && v[e] != ';') e++;
        while (e > 0 && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (vb_httpq_is(v, e, "application/json")) {
            r->json = 1;
        } else if (e > 17 && vb_httpq_is(v, 12, "application/") && vb_httpq_is(v + e - 5, 5, "+json")) {
            r->json = 1; /* handlers.is_json: application/...+json */
            for (size_t i = 12; i < e - 5; i++)
                if (v[i] == '/') r->json = 0;
        }
    } else if (vb_httpq_is(p, nl, "authorization")) {
        if (r->auth_count++ == 0) {
            r->auth_off = (size_t)(v - buf);
            r->auth_len = vl;
        }
    } else if (vb_httpq_is(p, nl, "x-request-id")) {
        r->rid_count++;
        r->rid_off = (size_t)(v - buf);
        r->rid_len = vl;
    } else if (vb_httpq_is(p, nl, "connection")) {
        if (!vb_httpq_is(v, vl, "keep-alive")) r->plain = 0;
    } else if (vb_httpq_is(p, nl, "transfer-encoding") || vb_httpq_is(p, nl, "upgrade")) {
        return 0; /* framed by its codings, or not HTTP after it: not this reader's to frame */
    } else if (vb_httpq_is(p, nl, "expect") || vb_httpq_is(p, nl, "content-encoding")) {
        r->plain = 0;
    }
    return 1;
}

/*
 * Parse the head at the start of buf[0, n). 1: a complete HTTP/1.1 head this reader takes, its
 * fields in *r; 0: anything else, including a head not complete yet and one with Transfer-Encoding
 * or Upgrade (where a request's end is not its Content-Length).
 */
static inline int vb_httpq_head(const unsigned char *buf, size_t n, vb_httpq_t *r) {
    memset(r, 0, sizeof(*r));
    r->content_length = -1;
    r->plain = 1;
    size_t lim = n < VB_HTTPQ_MAX_HEAD ? n : VB_HTTPQ_MAX_HEAD;
    /* request line: method SP target SP HTTP/1.1 CRLF */
    size_t i = 0;
    while (i < lim && vb_httpq_tchar(buf[i])) i++;
    if (i == 0 || i >= lim || buf[i] != ' ') return 0;
    size_t t = ++i;
    while (i < lim && buf[i] > ' ' && buf[i] < 0x7f) i++;
    if (i == t || i + 11 > lim || memcmp(buf + i, " HTTP/1.1\r\n", 11) != 0) return 0;
    i += 11;
    r->is_query = (i == sizeof(VB_HTTPQ_LINE) - 1 && memcmp(buf, VB_HTTPQ_LINE, i) == 0);
    unsigned seen = 0;
    int fields = 0;
    for (;;) {
        if (i + 1 >= lim) return 0;
        if (buf[i] == '\r') {
            if (buf[i + 1] != '\n') return 0;
            if (!(seen & (1u << VB_HTTPQ_HOST))) return 0; /* aiohttp answers 400 without Host */
            r->head_len = i + 2;
            return 1;
        }
        if (++fields > VB_HTTPQ_MAX_FIELDS) return 0;
        size_t a = i;
        while (i < lim && vb_httpq_tchar(buf[i])) i++;
        if (i == a || i >= lim || buf[i] != ':') return 0;
        size_t nl = i - a;
        i++;
        while (i < lim && (buf[i] == ' ' || buf[i] == '\t')) i++;
        size_t v = i;
        while (i < lim && ((buf[i] >= 0x20 && buf[i] < 0x7f) || buf[i] == '\t')) i++;
        if (i + 1 >= lim || buf[i] != '\r' || buf[i + 1] != '\n') return 0;
        size_t e = i;
        while (e > v && (buf[e - 1] == ' ' || buf[e - 1] == '\t')) e--;
        if (!vb_httpq_field(buf, buf + a, nl, buf + v, e - v, &seen, r)) return 0;
        i += 2;
    }
}

/* ------------------------------------------------------------------------------ the JSON body */

typedef struct {
    const unsigned char *p, *end;
} vb_jsonq_t;

static inline void vb_jsonq_ws(vb_jsonq_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static inline int vb_jsonq_lit(vb_jsonq_t *j, const char *lit) {
    size_t m = strlen(lit);
    if ((size_t)(j->end - j->p) < m || memcmp(j->p, lit, m) != 0) return 0;
    j->p += m;
    return 1;
}

/* A string without escapes or 8-bit bytes: its contents [*s, *s + *n). */
static inline int vb_jsonq_str(vb_jsonq_t *j, const unsigned char **s, size_t *n) {
    if (j->p >= j->end || *j->p != '"') return 0;
    const unsigned char *a = ++j->p;
    while (j->p < j->end && *j->p != '"') {
        if (*j->p == '\\' || *j->p < 0x20 || *j->p >= 0x80) return 0;
        j->p++;
    }
    if (j->p >= j->end) return 0;
    *s = a;
    *n = (size_t)(j->p - a);
    j->p++;
    return 1;
}

#if defined(__x86_64__) && LDBL_MANT_DIG == 64
static const long double VB_JSONQ_P10L[28] = {
    1e0L,  1e1L,  1e2L,  1e3L,  1e4L,  1e5L,  1e6L,  1e7L,  1e8L,  1e9L,  1e10L, 1e11L, 1e12L, 1e13L,
    1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L, 1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};
#endif

static const double VB_JSONQ_P10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                        1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* The "C" numeric locale strtod_l reads numbers in, whatever the process's locale; made once by
 * vb_httpq_init (the module's import, under the GIL) and kept. */
static locale_t vb_jsonq_c = (locale_t)0;

static inline int vb_httpq_init(void) {
    if (vb_jsonq_c == (locale_t)0) vb_jsonq_c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    return vb_jsonq_c != (locale_t)0 ? VB_OK : VB_ENOMEM;
}

/* Whether the 8 bytes of v (read little-endian) are all ASCII digits, and their value (the SWAR
 * forms of fast_float, Lemire 2021). */
static inline int vb_jsonq_8digits(uint64_t v) {
    return (((v & 0xF0F0F0F0F0F0F0F0ull) | (((v + 0x0606060606060606ull) & 0xF0F0F0F0F0F0F0F0ull) >> 4)) ==
            0x3333333333333333ull);
}

static inline uint32_t vb_jsonq_parse8(uint64_t v) {
    const uint64_t mask = 0x000000FF000000FFull, mul1 = 0x000F424000000064ull, mul2 = 0x0000271000000001ull;
    v -= 0x3030303030303030ull;
    v = (v * 10) + (v >> 8);
    v = (((v & mask) * mul1) + (((v >> 16) & mask) * mul2)) >> 32;
    return (uint32_t)v;
}

/*
 * A JSON number (RFC 8259 grammar) as the regular route sees it: an integer (no fraction, no
 * exponent) of magnitude <= 2^53 exactly, any other number as the nearest double. 0 for a
 * malformed number or an integer beyond 2^53 (the regular route converts those its own way).
 */
static inline int vb_jsonq_number(vb_jsonq_t *j, double *out) {
    const unsigned char *a = j->p, *p = j->p, *end = j->end;
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') return 0;
    uint64_t w = 0;
    int digits = 0; /* significant digits accumulated in w */
    int dropped = 0; /* integer digits beyond 19, not in w */
    if (*p == '0') {
        p++;
        if (p < end && *p >= '0' && *p <= '9') return 0; /* leading zero */
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits < 19) {
                w = w * 10 + (uint64_t)(*p - '0');
                digits++;
            } else {
                dropped++;
            }
            p++;
        }
    }
    int e10 = dropped, is_int = 1;
    if (p < end && *p == '.') {
        is_int = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        if (w == 0) {
            while (p < end && *p == '0') { /* leading zeros of a fraction are not significant */
                e10--;
                p++;
            }
        }
        while (digits + 8 <= 19 && end - p >= 8) { /* eight digits at a time (a double's repr has 17) */
            uint64_t v;
            memcpy(&v, p, 8);
            if (!vb_jsonq_8digits(v)) break;
            w = w * 100000000u + vb_jsonq_parse8(v);
            digits += 8;
            e10 -= 8;
            p += 8;
        }
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits < 19) {
                w = w * 10 + (uint64_t)(*p - '0');
                digits++;
                e10--;
            } else {
                dropped++;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        is_int = 0;
        p++;
        int eneg = 0;
        if (p < end && (*p == '+' || *p == '-')) eneg = (*p++ == '-');
        if (p >= end || *p < '0' || *p > '9') return 0;
        int x = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (x < 100000) x = x * 10 + (*p - '0');
            p++;
        }
        e10 += eneg ? -x : x;
    }
    j->p = p;
    if (is_int) {
        if (dropped || w > (1ull << 53)) return 0;
        *out = (double)w * (neg && w ? -1.0 : 1.0); /* -0 is the integer 0 */
        return 1;
    }
    if (w == 0) {
        *out = neg ? -0.0 : 0.0;
        return 1;
    }
    if (!dropped && w <= (1ull << 53) && e10 >= -22 && e10 <= 22) {
        /* Clinger's fast path: w and 10^|e10| are exact doubles, so one rounding */
        double d = (double)w;
        d = e10 < 0 ? d / VB_JSONQ_P10[-e10] : d * VB_JSONQ_P10[e10];
        *out = neg ? -d : d;
        return 1;
    }
#if defined(__x86_64__) && LDBL_MANT_DIG == 64
    if (!dropped && e10 >= -27 && e10 <= 27) {
        /* Up to 19 digits (17 from a double's repr): w < 2^64 and 10^|e10| (5^27 < 2^64) are exact
         * in x87 extended precision, so the quotient or product is rounded once, to 64 bits, and
         * rounding that to a double gives the correctly rounded double unless it sits exactly
         * halfway between two doubles (its 11 low bits 0x400), where the first rounding may have
         * made the tie: those few go to strtod. */
        long double x = (long double)w;
        x = e10 < 0 ? x / VB_JSONQ_P10L[-e10] : x * VB_JSONQ_P10L[e10];
        uint64_t m; /* the x87 format's 64-bit significand: its first 8 bytes (little-endian) */
        memcpy(&m, &x, sizeof m);
        if ((m & 0x7ff) != 0x400) {
            double d = (double)x;
            *out = neg ? -d : d;
            return 1;
        }
    }
#endif
    /* the rest correctly rounded by the C library, on a bounded copy */
    size_t len = (size_t)(p - a);
    char tmp[128];
    if (len >= sizeof tmp) return 0;
    memcpy(tmp, a, len);
    tmp[len] = 0;
    if (vb_jsonq_c == (locale_t)0) return 0;
    *out = strtod_l(tmp, NULL, vb_jsonq_c);
    return 1;
}

/* An array of exactly dim numbers, each finite as float32, into vec[0, dim). */
static inline int vb_jsonq_vector(vb_jsonq_t *j, size_t dim, float *vec) {
    if (j->p >= j->end || *j->p != '[') return 0;
    j->p++;
    for (size_t i = 0;; i++) {
        vb_jsonq_ws(j);
        double d;
        if (i >= dim || !vb_jsonq_number(j, &d)) return 0;
        float f = (float)d;
        if (!isfinite(f)) return 0;
        vec[i] = f;
        vb_jsonq_ws(j);
        if (j->p >= j->end) return 0;
        if (*j->p == ']') {
            j->p++;
            return i + 1 == dim;
        }
        if (*j->p != ',') return 0;
        j->p++;
    }
}

/* A JSON integer in 0 .. max for k and ef; 0 for anything else (the regular route answers it). */
static inline int vb_jsonq_count(vb_jsonq_t *j, int64_t max, int64_t *out) {
    const unsigned char *p = j->p;
    if (p >= j->end || *p < '0' || *p > '9') return 0;
    if (*p == '0' && p + 1 < j->end && p[1] >= '0' && p[1] <= '9') return 0;
    int64_t v = 0;
    while (p < j->end && *p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > max) return 0;
        p++;
    }
    if (p < j->end && (*p == '.' || *p == 'e' || *p == 'E')) return 0;
    j->p = p;
    *out = v;
    return 1;
}

#define VB_JSONQ_BAD 0x80000000u

/* The search fields queries and identify share: k, ef, include_metadata, search_tier. Returns the
 * field's bit (2, 4, 8, 16) with its value in *r, 0 for another key, VB_JSONQ_BAD for a value the
 * regular route answers (a wrong type, a negative or too large count, an unknown tier). */
static inline unsigned vb_jsonq_search_field(vb_jsonq_t *j, const unsigned char *key, size_t kl, int64_t max_k,
                                             int64_t max_ef, vb_httpq_t *r) {
    if (kl == 1 && key[0] == 'k') return vb_jsonq_count(j, max_k, &r->k) ? 2 : VB_JSONQ_BAD;
    if (kl == 2 && memcmp(key, "ef", 2) == 0) return vb_jsonq_count(j, max_ef, &r->ef) ? 4 : VB_JSONQ_BAD;
    if (kl == 16 && memcmp(key, "include_metadata", 16) == 0) {
        if (vb_jsonq_lit(j, "true")) r->include_metadata = 1;
        else if (vb_jsonq_lit(j, "false")) r->include_metadata = 0;
        else return VB_JSONQ_BAD;
        return 8;
    }
    if (kl == 11 && memcmp(key, "search_tier", 11) == 0) {
        const unsigned char *s;
        size_t sl;
        if (!vb_jsonq_str(j, &s, &sl)) return VB_JSONQ_BAD;
        if (sl == 6 && memcmp(s, "active", 6) == 0) r->tier = VB_HTTPQ_TIER_ACTIVE;
        else if (sl == 7 && memcmp(s, "archive", 7) == 0) r->tier = VB_HTTPQ_TIER_ARCHIVE;
        else if (sl == 3 && memcmp(s, "all", 3) == 0) r->tier = VB_HTTPQ_TIER_ALL;
        else return VB_JSONQ_BAD;
        return 16;
    }
    return 0;
}

#define VB_JSONQ_MAX_DEPTH 32

/*
 * Step over one JSON value (a query's filter object): strings with their escapes, nested objects
 * and arrays up to VB_JSONQ_MAX_DEPTH, numbers and literals by their characters. It only finds
 * where the value ends; the caller has the value itself checked by a full JSON parser.
 */
static inline int vb_jsonq_skip(vb_jsonq_t *j, int depth) {
    vb_jsonq_ws(j);
    if (j->p >= j->end) return 0;
    unsigned char c = *j->p;
    if (c == '"') {
        for (j->p++; j->p < j->end && *j->p != '"'; j->p++)
            if (*j->p == '\\' && ++j->p >= j->end) return 0;
        if (j->p >= j->end) return 0;
        j->p++;
        return 1;
    }
    if (c == '{' || c == '[') {
        unsigned char close = c == '{' ? '}' : ']';
        if (depth >= VB_JSONQ_MAX_DEPTH) return 0;
        j->p++;
        vb_jsonq_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return 1;
        }
        for (;;) {
            if (c == '{') {
                vb_jsonq_ws(j);
                if (j->p >= j->end || *j->p != '"' || !vb_jsonq_skip(j, depth + 1)) return 0;
                vb_jsonq_ws(j);
                if (j->p >= j->end || *j->p != ':') return 0;
                j->p++;
            }
            if (!vb_jsonq_skip(j, depth + 1)) return 0;
            vb_jsonq_ws(j);
            if (j->p >= j->end) return 0;
            if (*j->p == close) {
                j->p++;
                return 1;
            }
            if (*j->p != ',') return 0;
            j->p++;
        }
    }
    const unsigned char *a = j->p;
    while (j->p < j->end && ((*j->p >= '0' && *j->p <= '9') || (*j->p >= 'a' && *j->p <= 'z') ||
                             (*j->p >= 'A' && *j->p <= 'Z') || *j->p == '-' || *j->p == '+' || *j->p == '.'))
        j->p++;
    return j->p > a;
}

/* The opening brace of the body's object. */
static inline int vb_jsonq_open(vb_jsonq_t *j) {
    vb_jsonq_ws(j);
    if (j->p >= j->end || *j->p != '{') return 0;
    j->p++;
    return 1;
}

/* A member's key and its colon, up to its value. */
static inline int vb_jsonq_key(vb_jsonq_t *j, const unsigned char **key, size_t *kl) {
    vb_jsonq_ws(j);
    if (!vb_jsonq_str(j, key, kl)) return 0;
    vb_jsonq_ws(j);
    if (j->p >= j->end || *j->p != ':') return 0;
    j->p++;
    vb_jsonq_ws(j);
    return 1;
}

/* After a member's value: 1 and *done at the closing brace, 1 at a comma, 0 otherwise. */
static inline int vb_jsonq_next_member(vb_jsonq_t *j, int *done) {
    vb_jsonq_ws(j);
    if (j->p >= j->end) return 0;
    *done = *j->p == '}';
    if (*j->p != '}' && *j->p != ',') return 0;
    j->p++;
    return 1;
}

/*
 * The query body [body, body+n): 1 when it is the common query (see the top of this file), its
 * vector in vec[0, dim) as float32 and its other fields in *r; 0 otherwise.
 */
static inline int vb_httpq_query_body(const unsigned char *body, size_t n, size_t dim, int64_t max_k, int64_t max_ef,
                                      float *vec, vb_httpq_t *r) {
    vb_jsonq_t j = {body, body + n};
    r->filter_off = r->filter_len = 0;
    r->k = 10;
    r->ef = 50;
    r->include_metadata = 1;
    r->tier = VB_HTTPQ_TIER_ACTIVE;
    unsigned seen = 0;
    if (!vb_jsonq_open(&j)) return 0;
    vb_jsonq_ws(&j);
    if (j.p < j.end && *j.p == '}') return 0; /* no vector */
    for (;;) {
        const unsigned char *key;
        size_t kl;
        if (!vb_jsonq_key(&j, &key, &kl)) return 0;
        unsigned bit;
        if (kl == 6 && memcmp(key, "vector", 6) == 0) {
            bit = 1;
            if (!vb_jsonq_vector(&j, dim, vec)) return 0;
        } else if ((bit = vb_jsonq_search_field(&j, key, kl, max_k, max_ef, r)) != 0) {
            if (bit == VB_JSONQ_BAD) return 0;
        } else if (kl == 6 && memcmp(key, "filter", 6) == 0) {
            bit = 32;
            if (!vb_jsonq_lit(&j, "null")) {
                const unsigned char *a = j.p;
                if (j.p >= j.end || *j.p != '{' || !vb_jsonq_skip(&j, 0)) return 0;
                r->filter_off = (size_t)(a - body);
                r->filter_len = (size_t)(j.p - a);
            }
        } else {
            return 0;
        }
        if (seen & bit) return 0; /* a repeated field: orjson keeps the last, the regular route decides */
        seen |= bit;
        int done;
        if (!vb_jsonq_next_member(&j, &done)) return 0;
        if (done) break;
    }
    vb_jsonq_ws(&j);
    return j.p == j.end && (seen & 1);
}

/*
 * The identify body [body, body+n) in its plainest form: an object with "vectors" (an array of
 * 1 .. max_frames arrays of exactly dim JSON numbers) and optionally k (1 .. max_k: k = 0 answers
 * before any dimension check, the regular route does that), ef, include_metadata, search_tier,
 * each once. 1: frames written to out (room for max_frames * dim floats), their count in *frames;
 * 0 for anything else (the compact form included), which the regular route reads.
 */
static inline int vb_httpq_identify_body(const unsigned char *body, size_t n, size_t dim, size_t max_frames,
                                         int64_t max_k, int64_t max_ef, float *out, size_t *frames, vb_httpq_t *r) {
    vb_jsonq_t j = {body, body + n};
    r->k = 5;
    r->ef = 100;
    r->include_metadata = 1;
    r->tier = VB_HTTPQ_TIER_ALL;
    *frames = 0;
    unsigned seen = 0;
    if (!vb_jsonq_open(&j)) return 0;
    for (;;) {
        const unsigned char *key;
        size_t kl;
        if (!vb_jsonq_key(&j, &key, &kl)) return 0;
        unsigned bit;
        if (kl == 7 && memcmp(key, "vectors", 7) == 0) {
            bit = 1;
            if (j.p >= j.end || *j.p != '[') return 0;
            j.p++;
            for (size_t f = 0;; f++) {
                vb_jsonq_ws(&j);
                if (f >= max_frames || !vb_jsonq_vector(&j, dim, out + f * dim)) return 0;
                vb_jsonq_ws(&j);
                if (j.p >= j.end) return 0;
                if (*j.p == ']') {
                    j.p++;
                    *frames = f + 1;
                    break;
                }
                if (*j.p != ',') return 0;
                j.p++;
            }
        } else if ((bit = vb_jsonq_search_field(&j, key, kl, max_k, max_ef, r)) == 0 || bit == VB_JSONQ_BAD) {
            return 0;
        }
        if (seen & bit) return 0;
        seen |= bit;
        int done;
        if (!vb_jsonq_next_member(&j, &done)) return 0;
        if (done) break;
    }
    vb_jsonq_ws(&j);
    return j.p == j.end && (seen & 1) && r->k >= 1;
}
