/*
 * wsbench: the WebSocket side of the benchmark, in C so that neither the upstream nor the load
 * generator is what limits a Python proxy (bench/ws.py compiles it with `cc -O2`).
 *
 *   wsbench echo PORT
 *       An RFC 6455 echo server on 127.0.0.1:PORT, single-threaded epoll: every data frame is
 *       sent back with its opcode and FIN bit, unmasked; pings get pongs, a close gets a close.
 *       It negotiates no extension and no subprotocol, so no peer compresses on its upstream
 *       side. Prints "listening PORT" when ready.
 *   wsbench load PORT PATH CONNECTIONS SIZE BINARY WARMUP_S SECONDS
 *       CONNECTIONS WebSockets to 127.0.0.1:PORT PATH, each with one message of SIZE bytes
 *       (text when BINARY is 0) in flight: send, wait for the echo, compare it, send again.
 *       Counts echoes for SECONDS after WARMUP_S, then prints one JSON line.
 *   wsbench idle PORT PATH CONNECTIONS DEFLATE
 *       Opens CONNECTIONS WebSockets (at most 64 handshakes at a time), offering
 *       permessage-deflate as browsers do when DEFLATE is 1, prints one JSON line once all are
 *       open (or failed), then holds them, answering pings, until stdin closes.
 *
 * Client frames are masked with a fixed key (RFC 6455 asks for a random one; a server cannot
 * tell, and a precomputed frame keeps the client's cost per message to two system calls).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (256 * 1024)
#define MAX_FRAME (64u * 1024 * 1024)
#define MAX_HEAD 16384
#define MAX_EVENTS 256
#define MAX_PENDING_HANDSHAKES 64
#define HANDSHAKE_TIMEOUT_S 30.0
#define MAX_SAMPLES (8u * 1024 * 1024)
#define WRITE_HIGH_WATER (8u * 1024 * 1024)
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define CLIENT_KEY "dGhlIHNhbXBsZSBub25jZQ=="
static const uint8_t MASK[4] = {0x37, 0xfa, 0x21, 0x3d};

/* ---- SHA-1 and base64, for the server's Sec-WebSocket-Accept ------------------------------ */
static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *msg = calloc(total, 1);
    memcpy(msg, data, len);
    msg[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) msg[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)msg[off + 4 * i] << 24 | (uint32_t)msg[off + 4 * i + 1] << 16 |
                   (uint32_t)msg[off + 4 * i + 2] << 8 | msg[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(msg);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < len ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- buffers, connections ------------------------------------------------------------------ */
typedef struct {
    uint8_t *data;
    size_t len, cap, off; /* off: bytes already consumed (read side) or written (write side) */
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + extra <= b->cap) return;
    if (b->off) { /* compact first */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap) return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) { perror("realloc"); exit(2); }
    b->cap = cap;
}

static void buf_append(buf_t *b, const void *p, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

enum { HANDSHAKING, CONNECTING, OPEN, CLOSED };

typedef struct conn {
    int fd, state;
    buf_t in, out;
    double sent_at;
    int want_out;
} conn_t;

static int epfd;
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void arm(conn_t *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->out.len > c->out.off ? EPOLLOUT : 0),
                             .data.ptr = c};
    int want = (int)ev.events;
    if (want != c->want_out) {
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
}

static void add(conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    c->want_out = (int)events;
}

static void close_conn(conn_t *c) {
    if (c->state == CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
}

/* Write what can be written now; 0 on success, -1 when the connection broke. */
static int flush(conn_t *c) {
    while (c->out.off < c->out.len) {
        ssize_t n = write(c->fd, c->out.data + c->out.off, c->out.len - c->out.off);
        if (n > 0) { c->out.off += (size_t)n; continue; }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
    if (c->out.off == c->out.len) c->out.off = c->out.len = 0;
    arm(c);
    return 0;
}

/* Read what is there; 1 data read, 0 nothing now, -1 closed or broken. */
static int fill(conn_t *c) {
    int got = 0;
    for (;;) {
        buf_reserve(&c->in, READ_CHUNK);
        size_t room = c->in.cap - c->in.len;
        ssize_t n = read(c->fd, c->in.data + c->in.len, room);
        if (n > 0) { c->in.len += (size_t)n; got = 1; if ((size_t)n < room) return 1; continue; }
        if (n == 0) return -1;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return got;
        if (errno == EINTR) continue;
        return -1;
    }
}

static void frame_header(buf_t *b, int fin_opcode, size_t len, int masked) {
    uint8_t h[14];
    size_t n = 0;
    h[n++] = (uint8_t)fin_opcode;
    uint8_t m = masked ? 0x80 : 0;
    if (len < 126) h[n++] = m | (uint8_t)len;
    else if (len < 65536) { h[n++] = m | 126; h[n++] = (uint8_t)(len >> 8); h[n++] = (uint8_t)len; }
    else { h[n++] = m | 127; for (int i = 7; i >= 0; i--) h[n++] = (uint8_t)(len >> (8 * i)); }
    if (masked) { memcpy(h + n, MASK, 4); n += 4; }
    buf_append(b, h, n);
}

static void append_frame(buf_t *b, int fin_opcode, const uint8_t *payload, size_t len, int masked) {
    frame_header(b, fin_opcode, len, masked);
    buf_reserve(b, len);
    uint8_t *dst = b->data + b->len;
    if (masked) for (size_t i = 0; i < len; i++) dst[i] = payload[i] ^ MASK[i & 3];
    else memcpy(dst, payload, len);
    b->len += len;
}

/* Parse one frame at in.off. Returns 1 and fills the out-params when complete (payload
 * unmasked in place), 0 when more bytes are needed, -1 on a protocol error. */
static int next_frame(conn_t *c, int *fin_opcode, uint8_t **payload, size_t *len) {
    uint8_t *p = c->in.data + c->in.off;
    size_t avail = c->in.len - c->in.off, need = 2;
    if (avail < need) return 0;
    int masked = p[1] & 0x80;
    uint64_t n = p[1] & 0x7f;
    if (n == 126) { need += 2; if (avail < need) return 0; n = (uint64_t)p[2] << 8 | p[3]; }
    else if (n == 127) {
        need += 8;
        if (avail < need) return 0;
        n = 0;
        for (int i = 0; i < 8; i++) n = n << 8 | p[2 + i];
    }
    if (n > MAX_FRAME) return -1;
    uint8_t key[4] = {0};
    if (masked) { if (avail < need + 4) return 0; memcpy(key, p + need, 4); need += 4; }
    if (avail < need + n) { buf_reserve(&c->in, need + n - avail); return 0; }
    p = c->in.data + c->in.off; /* buf_reserve may have moved it */
    uint8_t *body = p + need;
    if (masked) for (uint64_t i = 0; i < n; i++) body[i] ^= key[i & 3];
    *fin_opcode = p[0];
    *payload = body;
    *len = (size_t)n;
    c->in.off += need + n;
    return 1;
}

static int set_nonblocking(int fd) { return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void raise_nofile(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

/* ---- echo server ---------------------------------------------------------------------------- */
static int serve_handshake(conn_t *c) {
    buf_reserve(&c->in, 1);
    c->in.data[c->in.len] = 0;
    char *head = (char *)c->in.data + c->in.off;
    char *end = strstr(head, "\r\n\r\n");
    if (!end) return c->in.len - c->in.off > MAX_HEAD ? -1 : 0;
    *end = 0;
    char *key = NULL;
    for (char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "sec-websocket-key:", 18) == 0) {
            key = line + 20;
            while (*key == ' ') key++;
            char *stop = strstr(key, "\r\n");
            if (stop) *stop = 0;
            break;
        }
    }
    if (!key) return -1;
    char joined[256], accept[64];
    uint8_t digest[20];
    snprintf(joined, sizeof joined, "%s%s", key, WS_GUID);
    sha1((uint8_t *)joined, strlen(joined), digest);
    base64(digest, 20, accept);
    char answer[512];
    int n = snprintf(answer, sizeof answer,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    buf_append(&c->out, answer, (size_t)n);
    c->in.off = (size_t)(end + 4 - (char *)c->in.data);
    c->state = OPEN;
    return 1;
}

/* Echo every complete frame, up to a write backlog of WRITE_HIGH_WATER (the rest waits for
 * the backlog to drain: echo_process runs again after each flush). */
static void echo_process(conn_t *c) {
    int op, r = 0;
    uint8_t *payload;
    size_t len;
    while (c->out.len - c->out.off < WRITE_HIGH_WATER && (r = next_frame(c, &op, &payload, &len)) == 1) {
        int opcode = op & 0x0f;
        if (opcode == 0x8) { append_frame(&c->out, 0x88, payload, len, 0); flush(c); close_conn(c); return; }
        if (opcode == 0x9) append_frame(&c->out, 0x8A, payload, len, 0);
        else if (opcode <= 0x2) append_frame(&c->out, op, payload, len, 0);
    }
    if (r < 0) { close_conn(c); return; }
    if (flush(c) < 0) close_conn(c);
}

static void echo_readable(conn_t *c) {
    if (fill(c) < 0) { close_conn(c); return; }
    if (c->state == HANDSHAKING) {
        int r = serve_handshake(c);
        if (r < 0) { close_conn(c); return; }
        if (r == 0) return;
    }
    echo_process(c);
}

static int run_echo(int port) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) { perror("listen"); return 2; }
    set_nonblocking(lfd);
    epfd = epoll_create1(0);
    conn_t listener = {.fd = lfd, .state = OPEN};
    add(&listener, EPOLLIN);
    printf("listening %d\n", port);
    fflush(stdout);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c == &listener) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->state = HANDSHAKING;
                    add(nc, EPOLLIN);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (flush(c) < 0) close_conn(c);
                else if (c->state == OPEN && c->in.len > c->in.off) echo_process(c);
            }
            if (c->state != CLOSED && evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) echo_readable(c);
            if (c->state == CLOSED) { free(c->in.data); free(c->out.data); free(c); }
        }
    }
}

/* ---- clients -------------------------------------------------------------------------------- */
typedef struct {
    const char *path;
    int port, deflate;
    size_t size;
    int binary;
    buf_t frame;      /* the precomputed masked frame every connection sends */
    uint8_t *payload; /* what must come back */
    uint64_t echoes, errors, mismatches, refused;
    uint32_t *samples;
    size_t nsamples;
    int counting;
} client_t;

static conn_t *open_client(client_t *cl) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cl->port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        close(fd);
        return NULL;
    }
    conn_t *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->state = CONNECTING;
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: " CLIENT_KEY "\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s\r\n",
                     cl->path, cl->port,
                     cl->deflate ? "Sec-WebSocket-Extensions: permessage-deflate; "
                                   "client_max_window_bits\r\n" : "");
    buf_append(&c->out, req, (size_t)n);
    add(c, EPOLLIN | EPOLLOUT);
    return c;
}

/* The 101 answer: 1 complete and accepted, 0 not complete, -1 refused or broken. */
static int client_handshake(conn_t *c) {
    buf_reserve(&c->in, 1);
    c->in.data[c->in.len] = 0;
    char *head = (char *)c->in.data + c->in.off;
    char *end = strstr(head, "\r\n\r\n");
    if (!end) return c->in.len - c->in.off > MAX_HEAD ? -1 : 0;
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) return -1;
    c->in.off = (size_t)(end + 4 - (char *)c->in.data);
    c->state = OPEN;
    return 1;
}

static void send_message(client_t *cl, conn_t *c) {
    buf_append(&c->out, cl->frame.data, cl->frame.len);
    c->sent_at = now();
    if (flush(c) < 0) { cl->errors++; close_conn(c); }
}

/* Reads frames; with `echo` set, each complete echo is checked, counted and answered with the
 * next message. Returns -1 when the connection ended. */
static int client_readable(client_t *cl, conn_t *c, int echo) {
    if (fill(c) < 0) return -1;
    if (c->state == CONNECTING) {
        int r = client_handshake(c);
        if (r < 0) { cl->refused++; return -1; }
        if (r == 0) return 0;
        if (echo) send_message(cl, c);
    }
    int op, r;
    uint8_t *payload;
    size_t len;
    while ((r = next_frame(c, &op, &payload, &len)) == 1) {
        int opcode = op & 0x0f;
        if (opcode == 0x9) { append_frame(&c->out, 0x8A, payload, len, 1); if (flush(c) < 0) return -1; continue; }
        if (opcode == 0xA) continue;
        if (opcode == 0x8) return -1;
        if (!echo) continue;
        if (!(op & 0x80) || opcode == 0) { cl->mismatches++; continue; } /* we send whole messages */
        if (len != cl->size || memcmp(payload, cl->payload, len) != 0 ||
            opcode != (cl->binary ? 0x2 : 0x1))
            cl->mismatches++;
        else if (cl->counting) {
            cl->echoes++;
            if (cl->nsamples < MAX_SAMPLES) cl->samples[cl->nsamples++] = (uint32_t)((now() - c->sent_at) * 1e6);
        }
        send_message(cl, c);
        if (c->state == CLOSED) return -1;
    }
    return r < 0 ? -1 : 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int run_load(int port, const char *path, int conns, size_t size, int binary, double warmup,
                    double seconds) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    epfd = epoll_create1(0);
    client_t cl = {.path = path, .port = port, .size = size, .binary = binary};
    cl.payload = malloc(size);
    const char *text = "pollguard websocket benchmark message; ";
    for (size_t i = 0; i < size; i++)
        cl.payload[i] = binary ? (uint8_t)(i * 2654435761u >> 24) : (uint8_t)text[i % strlen(text)];
    append_frame(&cl.frame, binary ? 0x82 : 0x81, cl.payload, size, 1);
    cl.samples = malloc(MAX_SAMPLES * sizeof *cl.samples);
    conn_t **all = calloc((size_t)conns, sizeof *all);
    int open = 0;
    for (int i = 0; i < conns; i++) if ((all[i] = open_client(&cl))) open++; else cl.errors++;
    double start = now(), measure_from = start + warmup, stop = measure_from + seconds, measured_at = 0;
    struct epoll_event evs[MAX_EVENTS];
    while (open > 0) {
        double t = now();
        if (!cl.counting && t >= measure_from) { cl.counting = 1; measured_at = t; }
        if (t >= stop) break;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 50);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->state == CLOSED) continue;
            int broken = (evs[i].events & EPOLLOUT) && flush(c) < 0;
            if (!broken && evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                broken = client_readable(&cl, c, 1) < 0;
            if (broken) { if (c->state == OPEN) cl.errors++; close_conn(c); open--; }
        }
    }
    double elapsed = cl.counting ? now() - measured_at : 0;
    qsort(cl.samples, cl.nsamples, sizeof *cl.samples, cmp_u32);
    double p50 = cl.nsamples ? cl.samples[cl.nsamples / 2] / 1000.0 : -1;
    double p99 = cl.nsamples ? cl.samples[(size_t)(cl.nsamples * 0.99)] / 1000.0 : -1;
    printf("{\"echoes\": %llu, \"seconds\": %.3f, \"per_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"errors\": %llu, \"mismatches\": %llu, \"refused\": %llu, \"open_at_end\": %d}\n",
           (unsigned long long)cl.echoes, elapsed, elapsed > 0 ? cl.echoes / elapsed : 0.0, p50, p99,
           (unsigned long long)cl.errors, (unsigned long long)cl.mismatches,
           (unsigned long long)cl.refused, open);
    return 0;
}

static int run_idle(int port, const char *path, int conns, int deflate) {
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    epfd = epoll_create1(0);
    client_t cl = {.path = path, .port = port, .deflate = deflate};
    conn_t stdin_conn = {.fd = 0, .state = OPEN};
    int started = 0, pending = 0, open = 0, reported = 0;
    double deadline = now() + HANDSHAKE_TIMEOUT_S, began = now();
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        while (started < conns && pending < MAX_PENDING_HANDSHAKES) {
            started++;
            if (open_client(&cl)) pending++; else cl.errors++;
        }
        if (!reported && (started == conns && pending == 0 ? 1 : now() > deadline)) {
            reported = 1;
            printf("{\"open\": %d, \"refused\": %llu, \"errors\": %llu, \"seconds\": %.3f}\n", open,
                   (unsigned long long)cl.refused, (unsigned long long)(cl.errors + pending),
                   now() - began);
            fflush(stdout);
            add(&stdin_conn, EPOLLIN);
        }
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c == &stdin_conn) {
                char sink[64];
                if (read(0, sink, sizeof sink) <= 0) return 0; /* the harness is done measuring */
                continue;
            }
            if (c->state == CLOSED) continue;
            int was_connecting = c->state == CONNECTING;
            uint64_t refused = cl.refused;
            int broken = (evs[i].events & EPOLLOUT) && flush(c) < 0;
            if (!broken && evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                broken = client_readable(&cl, c, 0) < 0;
            if (was_connecting && (broken || c->state == OPEN)) pending--;
            if (was_connecting && !broken && c->state == OPEN) open++;
            if (broken) {
                if (!was_connecting) open--;
                if (cl.refused == refused) cl.errors++; /* a refusal is counted as one */
                close_conn(c);
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "echo") == 0) return run_echo(atoi(argv[2]));
    if (argc == 9 && strcmp(argv[1], "load") == 0)
        return run_load(atoi(argv[2]), argv[3], atoi(argv[4]), (size_t)atol(argv[5]), atoi(argv[6]),
                        atof(argv[7]), atof(argv[8]));
    if (argc == 6 && strcmp(argv[1], "idle") == 0)
        return run_idle(atoi(argv[2]), argv[3], atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: wsbench echo PORT | load PORT PATH CONNS SIZE BINARY WARMUP SECONDS | "
                    "idle PORT PATH CONNS DEFLATE\n");
    return 2;
}
