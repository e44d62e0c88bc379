/*
 * loadgen.c - single-threaded epoll load generator for line-oriented TCP
 * echo / chat servers (chatd's benchmark: tests/perf/bench.py).
 *
 * Modes
 *   echo  C connections, each sends S-byte lines ('\n'-terminated, S counts
 *         the newline) keeping P lines in flight; every echoed line is checked
 *         byte-for-byte; per-line round-trip latency is recorded.
 *   chat  K sender connections + R receiver connections.  Every line sent by
 *         a sender must arrive at every other connection (receivers and the
 *         other senders).  Lines carry a unique token "@@<id:5hex><seq:10hex>:"
 *         followed by a deterministic payload, so a server may prefix lines
 *         ("<user3> ...") and still be verified.  Closed loop (window W lines
 *         outstanding per sender) by default, or open loop at --rate lines/s.
 *         With --conns2 N the last N receivers connect to a second address
 *         (--host2, --port2): another node of a cluster sharing one chat, so
 *         every line is verified across nodes as on one server.
 *   hold  C idle connections kept open D seconds (C10K tests); optionally
 *         probes each connection with one echoed line; reports how many were
 *         established / verified / still open, and the server's RSS growth.
 *
 * Safety: the target must be a loopback address (127.0.0.0/8 or ::1 is not
 * supported: IPv4 loopback only); every phase has a deadline, and a hard
 * alarm() ends the process if anything hangs.
 *
 * Output: human-readable lines, then one final machine-readable line
 *   RESULT mode=... key=value ...
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* configuration                                                       */

enum { M_ECHO, M_CHAT, M_HOLD };
enum { PH_CONNECT, PH_SYNC, PH_PROBE, PH_RUN, PH_DRAIN, PH_DONE };
enum { CS_IDLE, CS_CONNECTING, CS_OPEN, CS_CLOSED, CS_FAILED };

static struct {
    int mode;
    char host[64];
    int port;
    int conns;          /* echo/hold: connections; chat: receivers */
    int senders;        /* chat */
    int size;           /* bytes per line including '\n' */
    int depth;          /* echo pipelining depth */
    double duration;    /* measured seconds (hold: hold time) */
    double warmup;      /* seconds before measuring */
    double rate;        /* chat: total lines/s over all senders, 0 = closed loop */
    int window;         /* chat closed loop: outstanding lines per sender */
    double drain;       /* chat: max seconds to wait for stragglers */
    double stall;       /* chat: a line older than this is declared lost */
    int conc;           /* max simultaneous pending connects */
    double connect_timeout;
    double connect_phase;  /* deadline for the whole connect phase */
    double sync_timeout;
    int probe;          /* hold: probe each connection with an echo */
    int server_pid[8];  /* sample these pids (and descendants) for CPU/RSS, summed */
    int nserver_pid;
    int aux_pid;        /* sample this pid (and descendants) too, reported apart (aux_cpu) */
    char host2[64];     /* chat: the last conns2 receivers connect here */
    int port2;
    int conns2;
    int pss;            /* also read Pss (smaps_rollup) */
    char label[256];
} cfg = {
    .mode = M_ECHO, .host = "127.0.0.1", .port = 0, .conns = 1, .senders = 1,
    .size = 64, .depth = 1, .duration = 5, .warmup = 1, .rate = 0, .window = 16,
    .drain = 2, .stall = -1, .conc = 64, .connect_timeout = 15, .connect_phase = 60, .sync_timeout = 10,
    .probe = 0, .nserver_pid = 0, .aux_pid = 0, .pss = 0, .label = "",
    .host2 = "", .port2 = 0, .conns2 = 0,
};

/* ------------------------------------------------------------------ */
/* time, histogram                                                     */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* HDR-like log-linear histogram of nanosecond values, <1.6% bucket width */
#define HB 3840
typedef struct { uint64_t cnt[HB]; uint64_t n, max; } hist_t;

static inline int h_idx(uint64_t v)
{
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int e = msb - 6;
    return e * 64 + (int)(v >> e);
}
static inline double h_val(int i)
{
    if (i < 128) return i;
    int e = i / 64 - 1;
    uint64_t m = (uint64_t)(i - e * 64);
    uint64_t lo = m << e, hi = ((m + 1) << e) - 1;
    return (lo + hi) / 2.0;
}
static inline void h_add(hist_t *h, uint64_t v)
{
    h->cnt[h_idx(v)]++;
    h->n++;
    if (v > h->max) h->max = v;
}
static double h_pct_us(const hist_t *h, double q)
{
    if (!h->n) return 0;
    uint64_t rank = (uint64_t)(q * (double)h->n);
    if (rank < 1) rank = 1;
    if (rank > h->n) rank = h->n;
    uint64_t acc = 0;
    for (int i = 0; i < HB; i++) {
        acc += h->cnt[i];
        if (acc >= rank) return h_val(i) / 1000.0;
    }
    return h->max / 1000.0;
}

/* ------------------------------------------------------------------ */
/* line format                                                         */

#define HDR 18                      /* "@@" + 5 hex id + 10 hex seq + ':' */
#define TBL (1u << 20)
#define MAXSIZE 60000
static char tbl[TBL + MAXSIZE + 64];
static const char hexd[] = "0123456789abcdef";

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33; return x;
}
static void tbl_init(void)
{
    static const char al[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < sizeof tbl; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        tbl[i] = al[(s >> 11) % 62];
    }
}
static inline void put_hex(char *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) { p[i] = hexd[v & 15]; v >>= 4; }
}
static inline uint64_t pay_off(uint32_t id, uint64_t seq)
{
    return mix64(((uint64_t)id << 44) ^ seq ^ 0x5bd1e995ull) % TBL;
}
/* writes exactly cfg.size bytes */
static inline void gen_line(char *d, uint32_t id, uint64_t seq)
{
    int sz = cfg.size;
    d[0] = '@'; d[1] = '@';
    put_hex(d + 2, id, 5);
    put_hex(d + 7, seq, 10);
    d[17] = ':';
    int pl = sz - HDR - 1;
    if (pl > 0) memcpy(d + HDR, tbl + pay_off(id, seq), (size_t)pl);
    d[sz - 1] = '\n';
}
static inline int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}
/* Find and verify a token inside line [p, p+len) (len includes '\n').
 * Returns 1 ok (id/seq set), 0 no token marker at all, -1 garbled. */
static int parse_token(const char *p, size_t len, uint32_t *id, uint64_t *seq)
{
    const char *end = p + len;
    const char *s = p;
    int seen = 0;
    while ((s = memmem(s, (size_t)(end - s), "@@", 2)) != NULL) {
        seen = 1;
        if (end - s < HDR + 1) return -1;
        uint64_t v = 0;
        int ok = 1;
        for (int i = 2; i < 17; i++) {
            int h = hexval(s[i]);
            if (h < 0) { ok = 0; break; }
            v = (v << 4) | (uint64_t)h;
        }
        if (ok && s[17] == ':') {
            uint32_t i_d = (uint32_t)(v >> 40);
            uint64_t sq = v & ((1ull << 40) - 1);
            size_t rest = (size_t)(end - (s + HDR)); /* payload + '\n' */
            if (rest != (size_t)(cfg.size - HDR)) return -1;
            int pl = cfg.size - HDR - 1;
            if (pl > 0 && memcmp(s + HDR, tbl + pay_off(i_d, sq), (size_t)pl) != 0)
                return -1;
            *id = i_d; *seq = sq;
            return 1;
        }
        s += 1;
    }
    return seen ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* /proc sampling of the server (pid + all descendants)               */

typedef struct { double cpu_s; long rss_kb, pss_kb; int nprocs; int ok; } psample_t;

static long read_kv_kb(const char *path, const char *key)
{
    char buf[8192];
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strstr(buf, key);
    if (!p) return -1;
    p += strlen(key);
    while (*p == ' ' || *p == '\t' || *p == ':') p++;
    return strtol(p, NULL, 10);
}

/* CPU time of a process as the sum of its threads' sum_exec_runtime
 * (/proc/PID/task/TID/schedstat, ns).  Unlike utime+stime in /proc/PID/stat,
 * which this kernel samples per tick, it is exact even for the many
 * short-running processes of a fork-per-connection server.  -1 if absent. */
static double proc_runtime_s(int p)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", p);
    DIR *d = opendir(path);
    if (!d) return -1;
    double tot = 0; int got = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!isdigit((unsigned char)de->d_name[0])) continue;
        char sp[300], buf[128];
        snprintf(sp, sizeof sp, "/proc/%d/task/%s/schedstat", p, de->d_name);
        int fd = open(sp, O_RDONLY);
        if (fd < 0) continue;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0) continue;
        buf[k] = 0;
        tot += strtoull(buf, NULL, 10) / 1e9;
        got = 1;
    }
    closedir(d);
    return got ? tot : -1;
}

static psample_t proc_sample(int root);

/* The servers' sample: each of --server-pid's trees, summed. */
static psample_t servers_sample(void)
{
    psample_t r = {0};
    if (!cfg.nserver_pid) return r;
    r.ok = 1;
    for (int i = 0; i < cfg.nserver_pid; i++) {
        psample_t one = proc_sample(cfg.server_pid[i]);
        if (!one.ok) r.ok = 0;
        r.cpu_s += one.cpu_s; r.rss_kb += one.rss_kb; r.pss_kb += one.pss_kb; r.nprocs += one.nprocs;
    }
    return r;
}

static psample_t proc_sample(int root)
{
    psample_t r = {0};
    if (root <= 0) return r;
    int cap = 4096, n = 0;
    int *pid = malloc(sizeof(int) * cap), *ppid = malloc(sizeof(int) * cap);
    double *cpu = malloc(sizeof(double) * cap);
    char *mark = NULL;
    long hz = sysconf(_SC_CLK_TCK);
    DIR *d = opendir("/proc");
    if (!d) goto out;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!isdigit((unsigned char)de->d_name[0])) continue;
        char path[300], buf[1024];
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0) continue;
        buf[k] = 0;
        char *rp = strrchr(buf, ')');
        if (!rp) continue;
        /* after ") " : state ppid pgrp session tty tpgid flags minflt cminflt
         * majflt cmajflt utime stime */
        char st; int pp; unsigned long ut, stt;
        if (sscanf(rp + 2, "%c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
                   &st, &pp, &ut, &stt) != 4) continue;
        if (n == cap) {
            cap *= 2;
            pid = realloc(pid, sizeof(int) * cap);
            ppid = realloc(ppid, sizeof(int) * cap);
            cpu = realloc(cpu, sizeof(double) * cap);
        }
        pid[n] = atoi(de->d_name); ppid[n] = pp; cpu[n] = (double)(ut + stt) / hz;
        n++;
    }
    closedir(d);
    mark = calloc((size_t)n + 1, 1);
    {
        /* pid -> index map, then mark descendants pass by pass (trees are shallow) */
        int maxpid = 0;
        for (int i = 0; i < n; i++) if (pid[i] > maxpid) maxpid = pid[i];
        int *at = malloc(sizeof(int) * ((size_t)maxpid + 1));
        for (int i = 0; i <= maxpid; i++) at[i] = -1;
        for (int i = 0; i < n; i++) at[pid[i]] = i;
        if (root > maxpid || at[root] < 0) { free(at); goto out; }
        mark[at[root]] = 1;
        for (int changed = 1, pass = 0; changed && pass < 64; pass++) {
            changed = 0;
            for (int i = 0; i < n; i++) {
                if (mark[i] || ppid[i] <= 0 || ppid[i] > maxpid) continue;
                int j = at[ppid[i]];
                if (j >= 0 && mark[j]) { mark[i] = 1; changed = 1; }
            }
        }
        free(at);
    }
    for (int i = 0; i < n; i++) {
        if (!mark[i]) continue;
        char path[64];
        r.nprocs++;
        double rt = proc_runtime_s(pid[i]);
        r.cpu_s += rt >= 0 ? rt : cpu[i];
        snprintf(path, sizeof path, "/proc/%d/status", pid[i]);
        long v = read_kv_kb(path, "VmRSS");
        if (v > 0) r.rss_kb += v;
        if (cfg.pss) {
            snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid[i]);
            v = read_kv_kb(path, "\nPss");
            if (v > 0) r.pss_kb += v;
        }
    }
    r.ok = 1;
    if (getenv("LOADGEN_DEBUG"))
        fprintf(stderr, "proc_sample(%d): %d procs scanned, %d in tree, cpu %.2fs, rss %ld kB\n",
                root, n, r.nprocs, r.cpu_s, r.rss_kb);
out:
    free(pid); free(ppid); free(cpu); free(mark);
    return r;
}

/* machine-wide CPU ticks from /proc/stat: total, idle(+iowait), softirq */
typedef struct { unsigned long long tot, idle, si; } sysstat_t;
static sysstat_t sys_sample(void)
{
    sysstat_t s = {0, 0, 0};
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return s;
    unsigned long long v[10] = {0};
    if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
               &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]) >= 8) {
        for (int i = 0; i < 8; i++) s.tot += v[i];
        s.idle = v[3] + v[4];
        s.si = v[6];
    }
    fclose(f);
    return s;
}
static long slab_kb(void) { return read_kv_kb("/proc/meminfo", "\nSlab"); }

static double self_cpu_s(void)
{
    double rt = proc_runtime_s(getpid());
    if (rt >= 0) return rt;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------ */
/* connections                                                         */

typedef struct {
    int fd;
    uint8_t state;
    uint8_t epout;        /* EPOLLOUT currently requested */
    uint8_t attached;     /* chat: passed the join barrier */
    uint8_t probe_ok;
    int sender;           /* chat: sender index or -1 */
    uint64_t t_conn;
    char *rbuf; uint32_t rlen, rcap;
    char *wbuf; uint32_t woff, wlen, wcap;
    /* echo */
    uint64_t next_send, next_recv, lines_meas;
    uint64_t *tsend;
    /* chat receiver: next expected seq from each sender */
    uint64_t *cnext;
} conn_t;

typedef struct { uint64_t seq, t_send; int32_t remaining; } slot_t;
typedef struct {
    int ci;               /* connection index */
    int active;
    uint64_t next_seq, tail;
    slot_t *ring; uint64_t rmask;
    uint64_t sent_total, sent_meas;
    uint64_t nexp;        /* expected deliveries per line */
} sender_t;

static conn_t *conns;
static int nconns;
static sender_t *snd;
static int nsnd;
static int ep;
static int phase = PH_CONNECT;
static uint64_t t_begin, t_traffic, t_meas0, t_meas1, t_end_deadline;
static uint64_t ring_mask;   /* echo per-conn timestamp ring */
static char *scratch;        /* read buffer for hold mode */
static hist_t hist;

static struct {
    uint64_t est, conn_fail, conn_timeout, closed, io_err;
    uint64_t lines, lines_total, bytes_meas;
    uint64_t mismatch, unexpected, overlong;
    uint64_t foreign, garbled, self_echo, dup, late, sync_lines;
    uint64_t deliv_meas, deliv_total, lost_gap, lost_stall, lost_end, stale_deliv;
    uint64_t probe_ok, probe_bad, stalled, not_attempted, barrier_missing;
    int first_errno;
    uint64_t sync_missing;
    double connect_s, barrier_s;
} st;

static psample_t srv0, srv1, srvH0, aux0, aux1;
static double lg0, lg1;
static sysstat_t sy0, sy1;
static long slab0, slab1;
static uint64_t t_s0, t_s1;

static void die(const char *m) { perror(m); exit(2); }

static void ep_mod(conn_t *c, uint32_t idx, int want_out)
{
    if (c->epout == want_out) return;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0),
                              .data.u32 = idx };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->epout = (uint8_t)want_out;
}

static void conn_close(conn_t *c, int st_closed)
{
    if (c->fd >= 0) { epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); }
    c->fd = -1;
    c->state = (uint8_t)st_closed;
}

static void w_reserve(conn_t *c, uint32_t need)
{
    if (c->woff && c->woff == c->wlen) c->woff = c->wlen = 0;
    if (c->wlen + need <= c->wcap) return;
    if (c->woff) {
        memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
        c->wlen -= c->woff; c->woff = 0;
        if (c->wlen + need <= c->wcap) return;
    }
    uint32_t nc = c->wcap ? c->wcap : 4096;
    while (nc < c->wlen + need) nc *= 2;
    c->wbuf = realloc(c->wbuf, nc);
    if (!c->wbuf) die("realloc");
    c->wcap = nc;
}

/* returns 0 ok, -1 connection dead */
static int conn_flush(conn_t *c, uint32_t idx)
{
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) { c->woff += (uint32_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { ep_mod(c, idx, 1); return 0; }
        if (!st.first_errno) st.first_errno = errno;
        st.io_err++;
        conn_close(c, CS_CLOSED);
        st.closed++;
        return -1;
    }
    c->woff = c->wlen = 0;
    ep_mod(c, idx, 0);
    return 0;
}

static void start_connects(void)
{
    static int next = 0;
    static int pending = 0;
    /* count pending */
    pending = 0;
    for (int i = 0; i < next; i++) if (conns[i].state == CS_CONNECTING) pending++;
    struct sockaddr_in sa1 = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.port) };
    inet_pton(AF_INET, cfg.host, &sa1.sin_addr);
    struct sockaddr_in sa2 = sa1;
    if (cfg.conns2) {
        sa2.sin_port = htons((uint16_t)cfg.port2);
        inet_pton(AF_INET, cfg.host2, &sa2.sin_addr);
    }
    while (pending < cfg.conc && next < nconns) {
        conn_t *c = &conns[next];
        uint32_t idx = (uint32_t)next++;
        /* senders come first, then receivers; the last conns2 receivers go to the second address */
        struct sockaddr_in sa = (int)idx >= nconns - cfg.conns2 ? sa2 : sa1;
        c->t_conn = now_ns();
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            if (!st.first_errno) st.first_errno = errno;
            c->state = CS_FAILED; st.conn_fail++; continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
        if (r < 0 && errno != EINPROGRESS) {
            if (!st.first_errno) st.first_errno = errno;
            close(fd); c->fd = -1; c->state = CS_FAILED; st.conn_fail++; continue;
        }
        struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = idx };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
        c->epout = 1;
        c->state = CS_CONNECTING;
        pending++;
    }
}

static int connects_done(void)
{
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == CS_IDLE || conns[i].state == CS_CONNECTING) return 0;
    return 1;
}

static void check_connect_timeouts(uint64_t now)
{
    uint64_t lim = (uint64_t)(cfg.connect_timeout * 1e9);
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == CS_CONNECTING && now > c->t_conn && now - c->t_conn > lim) {
            conn_close(c, CS_FAILED);
            st.conn_timeout++;
            st.conn_fail++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* echo                                                                */

static void echo_fill(conn_t *c, uint32_t idx, uint64_t now)
{
    if (c->state != CS_OPEN) return;
    int added = 0;
    while (c->next_send - c->next_recv < (uint64_t)cfg.depth) {
        w_reserve(c, (uint32_t)cfg.size);
        gen_line(c->wbuf + c->wlen, idx, c->next_send);
        c->wlen += (uint32_t)cfg.size;
        c->tsend[c->next_send & ring_mask] = now;
        c->next_send++;
        added = 1;
    }
    if (added && !c->epout) conn_flush(c, idx);
}

static inline int in_window(uint64_t t) { return t >= t_meas0 && t < t_meas1; }

static void echo_lines(conn_t *c, uint64_t now)
{
    char exp[MAXSIZE + 8];
    char *p = c->rbuf, *end = c->rbuf + c->rlen;
    int inw = phase == PH_RUN && in_window(now);
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) break;
        size_t L = (size_t)(nl - p) + 1;
        if (c->next_recv >= c->next_send) {
            st.unexpected++;
        } else {
            gen_line(exp, (uint32_t)(c - conns), c->next_recv);
            if (L != (size_t)cfg.size || memcmp(p, exp, L) != 0) st.mismatch++;
            if (inw) {
                h_add(&hist, now - c->tsend[c->next_recv & ring_mask]);
                c->lines_meas++;
                st.lines++;
            }
            st.lines_total++;
            c->next_recv++;
        }
        p = nl + 1;
    }
    uint32_t rem = (uint32_t)(end - p);
    if (rem && p != c->rbuf) memmove(c->rbuf, p, rem);
    c->rlen = rem;
    if (c->rlen == c->rcap) { st.overlong++; c->rlen = 0; }
}

/* ------------------------------------------------------------------ */
/* chat                                                                */

static uint32_t sync_nonce;
static uint64_t last_sync_sent;

static void chat_release(sender_t *s, uint64_t seq, uint64_t *ctr)
{
    if (seq < s->tail || seq >= s->next_seq) return;
    slot_t *sl = &s->ring[seq & s->rmask];
    if (sl->seq == seq && sl->remaining > 0) { sl->remaining--; (*ctr)++; }
}
/* Traffic starts: the measured window opens after the warm-up (tests/perf/bench.py counts
 * the server's system calls over it from this line). */
static void announce_traffic(void)
{
    printf("TRAFFIC warmup=%.3f duration=%.3f\n", cfg.warmup, cfg.duration);
    fflush(stdout);
}

static void chat_advance(sender_t *s)
{
    while (s->tail < s->next_seq && s->ring[s->tail & s->rmask].remaining <= 0) s->tail++;
}

static void chat_lines(conn_t *c, uint64_t now)
{
    char *p = c->rbuf, *end = c->rbuf + c->rlen;
    int inw = in_window(now);
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) break;
        size_t L = (size_t)(nl - p) + 1;
        char *sy = memmem(p, L, "##SYNC", 6);
        if (sy) {
            st.sync_lines++;
            if (nl - sy >= 14) {
                uint32_t v = 0; int ok = 1;
                for (int i = 6; i < 14; i++) { int h = hexval(sy[i]); if (h < 0) { ok = 0; break; } v = v * 16 + (uint32_t)h; }
                if (ok && v == sync_nonce && phase == PH_SYNC) c->attached = 1;
            }
            p = nl + 1; continue;
        }
        uint32_t id; uint64_t seq;
        /* chatd ends every chat line with CRLF. Let a CR stand where the LF was:
         * the line's length and its payload are still checked byte for byte. */
        int r = parse_token(p, (L >= 2 && p[L - 2] == '\r') ? L - 1 : L, &id, &seq);
        if (r == 0) { st.foreign++; p = nl + 1; continue; }
        if (r < 0 || id >= (uint32_t)nsnd) { st.garbled++; p = nl + 1; continue; }
        if ((int)id == c->sender) { st.self_echo++; p = nl + 1; continue; }
        if (!c->attached) { st.late++; p = nl + 1; continue; }
        sender_t *s = &snd[id];
        uint64_t e = c->cnext[id];
        if (seq < e) { st.dup++; p = nl + 1; continue; }
        for (uint64_t j = (seq - e > 1000000 ? seq - 1000000 : e); j < seq; j++)
            chat_release(s, j, &st.lost_gap);
        c->cnext[id] = seq + 1;
        if (seq >= s->tail && seq < s->next_seq) {
            slot_t *sl = &s->ring[seq & s->rmask];
            if (sl->seq == seq && sl->remaining > 0) {
                sl->remaining--;
                st.deliv_total++;
                if (inw) { st.deliv_meas++; h_add(&hist, now - sl->t_send); }
            } else st.stale_deliv++;
        } else st.stale_deliv++;
        p = nl + 1;
    }
    uint32_t rem = (uint32_t)(end - p);
    if (rem && p != c->rbuf) memmove(c->rbuf, p, rem);
    c->rlen = rem;
    if (c->rlen == c->rcap) { st.overlong++; c->rlen = 0; }
}

static void chat_send(sender_t *s, uint64_t now, uint64_t n)
{
    conn_t *c = &conns[s->ci];
    if (c->state != CS_OPEN || !n) return;
    w_reserve(c, (uint32_t)(cfg.size * n));
    for (uint64_t k = 0; k < n; k++) {
        uint64_t q = s->next_seq++;
        slot_t *sl = &s->ring[q & s->rmask];
        sl->seq = q; sl->t_send = now; sl->remaining = (int32_t)s->nexp;
        gen_line(c->wbuf + c->wlen, (uint32_t)(s - snd), q);
        c->wlen += (uint32_t)cfg.size;
        s->sent_total++;
        if (in_window(now)) s->sent_meas++;
    }
    if (!c->epout) conn_flush(c, (uint32_t)s->ci);
}

static void chat_pump(uint64_t now)
{
    if (phase != PH_RUN || now >= t_meas1) return;
    for (int i = 0; i < nsnd; i++) {
        sender_t *s = &snd[i];
        if (!s->active) continue;
        chat_advance(s);
        uint64_t room = s->rmask + 1 - (s->next_seq - s->tail);
        uint64_t n;
        if (cfg.rate > 0) {
            double per = cfg.rate / nsnd;
            uint64_t due = (uint64_t)((double)(now - t_traffic) / 1e9 * per) + 1;
            n = due > s->next_seq ? due - s->next_seq : 0;
            if (n > 4096) n = 4096;
        } else {
            uint64_t out = s->next_seq - s->tail;
            n = out < (uint64_t)cfg.window ? (uint64_t)cfg.window - out : 0;
        }
        if (n > room) n = room;
        chat_send(s, now, n);
    }
}

static void chat_stall_check(uint64_t now)
{
    uint64_t lim = (uint64_t)(cfg.stall * 1e9);
    for (int i = 0; i < nsnd; i++) {
        sender_t *s = &snd[i];
        chat_advance(s);
        while (s->tail < s->next_seq) {
            slot_t *sl = &s->ring[s->tail & s->rmask];
            if (sl->remaining > 0 && now - sl->t_send <= lim) break;
            if (sl->remaining > 0) { st.lost_stall += (uint64_t)sl->remaining; sl->remaining = 0; }
            s->tail++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* event handling                                                      */

static void on_established(conn_t *c, uint32_t idx)
{
    c->state = CS_OPEN;
    st.est++;
    ep_mod(c, idx, 0);   /* connecting sockets were registered with EPOLLOUT */
    if (cfg.mode != M_HOLD) {
        c->rcap = cfg.mode == M_CHAT ? 65536 : (uint32_t)(cfg.size * 4 > 8192 ? cfg.size * 4 : 8192);
        c->rbuf = malloc(c->rcap);
        if (!c->rbuf) die("malloc");
    }
    if (cfg.mode == M_ECHO) {
        c->tsend = calloc(ring_mask + 1, sizeof(uint64_t));
        if (!c->tsend) die("calloc");
    }
}

static void handle_event(uint32_t idx, uint32_t evs)
{
    conn_t *c = &conns[idx];
    if (c->state == CS_CONNECTING) {
        int err = 0; socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err == 0 && (evs & EPOLLOUT) && !(evs & (EPOLLERR | EPOLLHUP))) {
            on_established(c, idx);
        } else if (err || (evs & (EPOLLERR | EPOLLHUP))) {
            if (!st.first_errno) st.first_errno = err ? err : ECONNRESET;
            conn_close(c, CS_FAILED);
            st.conn_fail++;
        }
        return;
    }
    if (c->state != CS_OPEN) return;
    if (evs & EPOLLOUT) {
        if (conn_flush(c, idx) < 0) return;
    }
    if (evs & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        char *buf; uint32_t room;
        if (cfg.mode == M_HOLD) { buf = scratch; room = 65536; }
        else { buf = c->rbuf + c->rlen; room = c->rcap - c->rlen; }
        ssize_t n;
        do n = recv(c->fd, buf, room, 0); while (n < 0 && errno == EINTR);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            if (n < 0) { st.io_err++; if (!st.first_errno) st.first_errno = errno; }
            conn_close(c, CS_CLOSED);
            st.closed++;
            return;
        }
        if (n < 0) return;
        uint64_t now = now_ns();
        if (cfg.mode == M_HOLD) {
            if (cfg.probe && !c->probe_ok) {
                char exp[MAXSIZE + 8];
                gen_line(exp, idx, 0);
                if (n >= cfg.size && memcmp(buf, exp, (size_t)cfg.size) == 0) { c->probe_ok = 1; st.probe_ok++; }
                else st.probe_bad++;
            }
            return;
        }
        c->rlen += (uint32_t)n;
        if (in_window(now)) st.bytes_meas += (uint64_t)n;
        if (cfg.mode == M_ECHO) {
            echo_lines(c, now);
            if (phase == PH_RUN && now < t_meas1) echo_fill(c, idx, now);
        } else {
            chat_lines(c, now);
        }
    }
}

/* ------------------------------------------------------------------ */

static void on_alarm(int sig)
{
    (void)sig;
    static const char m[] = "loadgen: hard time limit reached, aborting\nRESULT status=timeout\n";
    if (write(1, m, sizeof m - 1) < 0) {}
    _exit(3);
}

static void usage(void)
{
    fprintf(stderr,
"usage: loadgen MODE [options]     MODE = echo | chat | hold\n"
"  -H, --host A         target IPv4 loopback address (default 127.0.0.1)\n"
"  -p, --port N         target port (required)\n"
"  -c, --conns N        echo/hold: connections; chat: receivers (default 1)\n"
"  -S, --senders N      chat: sender connections (default 1)\n"
"  -s, --size N         bytes per line incl. newline (default 64, min 19)\n"
"  -P, --depth N        echo: lines in flight per connection (default 1)\n"
"  -d, --duration S     measured seconds / hold seconds (default 5)\n"
"  -w, --warmup S       warm-up seconds (default 1)\n"
"  -R, --rate N         chat: total lines/s over all senders (0 = closed loop)\n"
"  -W, --window N       chat closed loop: outstanding lines per sender (16)\n"
"      --drain S        chat: wait up to S s for in-flight lines (default 2)\n"
"      --stall S        a line unanswered for S s counts as lost/stalled\n"
"                       (default: echo 1, chat 5)\n"
"      --conc N         max simultaneous pending connects (default 64)\n"
"      --connect-timeout S  per-connection connect timeout (default 15)\n"
"      --connect-phase S    deadline for establishing all connections (default 60)\n"
"      --sync-timeout S     chat join barrier timeout (default 10)\n"
"      --probe          hold: verify each connection with one echoed line\n"
"      --server-pid PID[,PID...]  sample CPU and RSS of each PID and its descendants (summed)\n"
"      --aux-pid PID    also sample PID's CPU, reported apart (aux_cpu; a cluster's bus)\n"
"      --host2 A, --port2 N  chat: a second address (another node; default: --host, --port)\n"
"      --conns2 N       chat: the last N of the receivers connect to the second address\n"
"      --pss            also sum Pss (smaps_rollup) of the server tree\n"
"      --label TEXT     free text copied into the RESULT line (no spaces)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2) usage();
    if (!strcmp(argv[1], "echo")) cfg.mode = M_ECHO;
    else if (!strcmp(argv[1], "chat")) cfg.mode = M_CHAT;
    else if (!strcmp(argv[1], "hold")) cfg.mode = M_HOLD;
    else usage();
    static struct option lo[] = {
        {"host", 1, 0, 'H'}, {"port", 1, 0, 'p'}, {"conns", 1, 0, 'c'},
        {"senders", 1, 0, 'S'}, {"size", 1, 0, 's'}, {"depth", 1, 0, 'P'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'}, {"rate", 1, 0, 'R'},
        {"window", 1, 0, 'W'}, {"drain", 1, 0, 1}, {"stall", 1, 0, 2},
        {"conc", 1, 0, 3}, {"connect-timeout", 1, 0, 4}, {"sync-timeout", 1, 0, 5},
        {"probe", 0, 0, 6}, {"server-pid", 1, 0, 7}, {"pss", 0, 0, 8},
        {"label", 1, 0, 9}, {"connect-phase", 1, 0, 10}, {"host2", 1, 0, 11}, {"port2", 1, 0, 12},
        {"conns2", 1, 0, 13}, {"aux-pid", 1, 0, 14}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    int o;
    optind = 2;
    while ((o = getopt_long(argc, argv, "H:p:c:S:s:P:d:w:R:W:h", lo, NULL)) != -1) {
        switch (o) {
        case 'H': snprintf(cfg.host, sizeof cfg.host, "%s", optarg); break;
        case 'p': cfg.port = atoi(optarg); break;
        case 'c': cfg.conns = atoi(optarg); break;
        case 'S': cfg.senders = atoi(optarg); break;
        case 's': cfg.size = atoi(optarg); break;
        case 'P': cfg.depth = atoi(optarg); break;
        case 'd': cfg.duration = atof(optarg); break;
        case 'w': cfg.warmup = atof(optarg); break;
        case 'R': cfg.rate = atof(optarg); break;
        case 'W': cfg.window = atoi(optarg); break;
        case 1: cfg.drain = atof(optarg); break;
        case 2: cfg.stall = atof(optarg); break;
        case 3: cfg.conc = atoi(optarg); break;
        case 4: cfg.connect_timeout = atof(optarg); break;
        case 5: cfg.sync_timeout = atof(optarg); break;
        case 6: cfg.probe = 1; break;
        case 7:
            for (char *tok = strtok(optarg, ","); tok; tok = strtok(NULL, ",")) {
                if (cfg.nserver_pid == 8) { fprintf(stderr, "loadgen: at most 8 server pids\n"); return 2; }
                cfg.server_pid[cfg.nserver_pid++] = atoi(tok);
            }
            break;
        case 8: cfg.pss = 1; break;
        case 9: snprintf(cfg.label, sizeof cfg.label, "%s", optarg); break;
        case 10: cfg.connect_phase = atof(optarg); break;
        case 11: snprintf(cfg.host2, sizeof cfg.host2, "%s", optarg); break;
        case 12: cfg.port2 = atoi(optarg); break;
        case 13: cfg.conns2 = atoi(optarg); break;
        case 14: cfg.aux_pid = atoi(optarg); break;
        default: usage();
        }
    }
    struct in_addr ia;
    if (inet_pton(AF_INET, cfg.host, &ia) != 1 || (ntohl(ia.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: refusing non-loopback target '%s' (127.0.0.0/8 only)\n", cfg.host);
        return 2;
    }
    if (cfg.port <= 0 || cfg.port > 65535) { fprintf(stderr, "loadgen: --port required\n"); return 2; }
    if (cfg.conns2) {
        if (!cfg.host2[0]) snprintf(cfg.host2, sizeof cfg.host2, "%s", cfg.host);
        if (!cfg.port2) cfg.port2 = cfg.port;
        if (inet_pton(AF_INET, cfg.host2, &ia) != 1 || (ntohl(ia.s_addr) >> 24) != 127) {
            fprintf(stderr, "loadgen: refusing non-loopback target '%s' (127.0.0.0/8 only)\n", cfg.host2);
            return 2;
        }
        if (cfg.mode != M_CHAT || cfg.conns2 < 0 || cfg.conns2 > cfg.conns || cfg.port2 <= 0 || cfg.port2 > 65535) {
            fprintf(stderr, "loadgen: --conns2 is for chat, at most --conns receivers, with a valid --port2\n");
            return 2;
        }
    }
    if (cfg.size < HDR + 1 || cfg.size > MAXSIZE) { fprintf(stderr, "loadgen: size must be %d..%d\n", HDR + 1, MAXSIZE); return 2; }
    if (cfg.conns < 1 || cfg.conns > 1000000 || cfg.depth < 1 || cfg.depth > 65536 ||
        cfg.senders < 1 || cfg.senders > 4096 || cfg.window < 1 || cfg.conc < 1 ||
        cfg.duration <= 0 || cfg.duration > 3600 || cfg.warmup < 0 || cfg.warmup > 600) {
        fprintf(stderr, "loadgen: bad option value\n"); return 2;
    }
    if (cfg.stall < 0) cfg.stall = cfg.mode == M_ECHO ? 1.0 : 5.0;
    for (char *q = cfg.label; *q; q++) if (isspace((unsigned char)*q)) *q = '_';

    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    double budget = 2 * cfg.connect_phase + cfg.sync_timeout + cfg.warmup + cfg.duration +
                    cfg.drain + 30 + (cfg.mode == M_HOLD ? 15 : 0);
    alarm((unsigned)budget);

    nconns = cfg.mode == M_CHAT ? cfg.conns + cfg.senders : cfg.conns;
    nsnd = cfg.mode == M_CHAT ? cfg.senders : 0;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t need = (rlim_t)nconns + 64;
    if (rl.rlim_cur < need) {
        if (rl.rlim_max < need) rl.rlim_max = need;   /* works as root */
        rl.rlim_cur = need;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
            getrlimit(RLIMIT_NOFILE, &rl);
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
            fprintf(stderr, "loadgen: warning: RLIMIT_NOFILE limited to %llu\n",
                    (unsigned long long)rl.rlim_cur);
        }
    }

    tbl_init();
    uint64_t r = 1;
    while (r < (uint64_t)cfg.depth) r <<= 1;
    ring_mask = r - 1;
    conns = calloc((size_t)nconns, sizeof(conn_t));
    if (!conns) die("calloc");
    for (int i = 0; i < nconns; i++) { conns[i].fd = -1; conns[i].sender = -1; }
    scratch = malloc(65536);
    if (nsnd) {
        snd = calloc((size_t)nsnd, sizeof(sender_t));
        uint64_t rs = 1;
        uint64_t want = cfg.rate > 0 ? 65536 : (uint64_t)cfg.window * 2;
        while (rs < want) rs <<= 1;
        for (int i = 0; i < nsnd; i++) {
            snd[i].ci = i;
            snd[i].rmask = rs - 1;
            snd[i].ring = calloc(rs, sizeof(slot_t));
            conns[i].sender = i;
        }
        for (int i = 0; i < nconns; i++) conns[i].cnext = calloc((size_t)nsnd, sizeof(uint64_t));
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");

    if (cfg.mode == M_HOLD) srvH0 = servers_sample();
    if (cfg.mode == M_HOLD) slab0 = slab_kb();

    t_begin = now_ns();
    uint64_t dl_connect = t_begin + (uint64_t)(cfg.connect_phase * 1e9);
    t_meas0 = t_meas1 = UINT64_MAX;
    struct epoll_event evs[1024];
    uint64_t last_check = 0, t_phase = 0;
    start_connects();

    while (phase != PH_DONE) {
        int timeout = (cfg.mode == M_CHAT && cfg.rate > 0) ? 1 : 10;
        int n = epoll_wait(ep, evs, 1024, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) handle_event(evs[i].data.u32, evs[i].events);
        uint64_t now = now_ns();

        switch (phase) {
        case PH_CONNECT:
            start_connects();
            if (now - last_check > 100000000ull) { check_connect_timeouts(now); last_check = now; }
            if (connects_done() || now > dl_connect) {
                if (!connects_done()) {
                    check_connect_timeouts(UINT64_MAX / 2);
                    for (int k = 0; k < nconns; k++)
                        if (conns[k].state == CS_IDLE) { conns[k].state = CS_FAILED; st.conn_fail++; st.not_attempted++; }
                }
                st.connect_s = (now - t_begin) / 1e9;
                t_phase = now;
                if (cfg.mode == M_ECHO) {
                    /* barrier: every connection sends one line and must get it
                     * back before traffic starts, so the server has really
                     * accepted every connection (fork servers accept slowly
                     * once traffic competes for the CPU) */
                    phase = PH_SYNC;
                    int save = cfg.depth; cfg.depth = 1;
                    for (int k = 0; k < nconns; k++) echo_fill(&conns[k], (uint32_t)k, now);
                    cfg.depth = save;
                } else if (cfg.mode == M_CHAT) {
                    phase = PH_SYNC;
                    sync_nonce = (uint32_t)(mix64(now) & 0xffffffff);
                    last_sync_sent = 0;
                } else {
                    phase = PH_PROBE;
                    if (cfg.probe) {
                        for (int k = 0; k < nconns; k++) {
                            conn_t *c = &conns[k];
                            if (c->state != CS_OPEN) continue;
                            w_reserve(c, (uint32_t)cfg.size);
                            gen_line(c->wbuf + c->wlen, (uint32_t)k, 0);
                            c->wlen += (uint32_t)cfg.size;
                            conn_flush(c, (uint32_t)k);
                        }
                    }
                }
            }
            break;
        case PH_SYNC: {
            if (cfg.mode == M_ECHO) {
                int missing = 0;
                for (int k = 0; k < nconns; k++)
                    if (conns[k].state == CS_OPEN && conns[k].next_recv == 0) missing++;
                if (missing == 0 || now - t_phase > (uint64_t)(cfg.connect_phase * 1e9)) {
                    st.barrier_missing = (uint64_t)missing;
                    st.barrier_s = (now - t_phase) / 1e9;
                    phase = PH_RUN;
                    t_traffic = now;
                    t_meas0 = now + (uint64_t)(cfg.warmup * 1e9);
                    t_meas1 = t_meas0 + (uint64_t)(cfg.duration * 1e9);
                    announce_traffic();
                    for (int k = 0; k < nconns; k++) echo_fill(&conns[k], (uint32_t)k, now);
                }
                break;
            }
            conn_t *s0 = &conns[0];
            if (s0->state != CS_OPEN) {
                fprintf(stderr, "loadgen: sender connection not open; aborting\n");
                phase = PH_DONE; break;
            }
            int missing = 0;
            for (int k = 1; k < nconns; k++)
                if (conns[k].state == CS_OPEN && !conns[k].attached) missing++;
            int timed_out = now - t_phase > (uint64_t)(cfg.sync_timeout * 1e9);
            if (missing == 0 || timed_out) {
                st.sync_missing = (uint64_t)missing;
                s0->attached = 1;
                int att = 0;
                for (int k = 0; k < nconns; k++)
                    if (conns[k].state == CS_OPEN && conns[k].attached) att++;
                for (int k = 0; k < nsnd; k++) {
                    snd[k].active = conns[k].state == CS_OPEN && conns[k].attached;
                    snd[k].nexp = att > 0 ? (uint64_t)(att - 1) : 0;
                    if (!snd[k].nexp) snd[k].active = 0;
                }
                phase = PH_RUN;
                t_traffic = now;
                t_meas0 = now + (uint64_t)(cfg.warmup * 1e9);
                t_meas1 = t_meas0 + (uint64_t)(cfg.duration * 1e9);
                announce_traffic();
                chat_pump(now);
            } else if (now - last_sync_sent > 200000000ull) {
                char line[32];
                int L = snprintf(line, sizeof line, "##SYNC%08x\n", sync_nonce);
                w_reserve(s0, (uint32_t)L);
                memcpy(s0->wbuf + s0->wlen, line, (size_t)L);
                s0->wlen += (uint32_t)L;
                if (!s0->epout) conn_flush(s0, 0);
                last_sync_sent = now;
            }
            break;
        }
        case PH_PROBE: {
            int done = 1;
            if (cfg.probe) {
                for (int k = 0; k < nconns; k++)
                    if (conns[k].state == CS_OPEN && !conns[k].probe_ok) { done = 0; break; }
            }
            if (done || now - t_phase > 10000000000ull) {
                phase = PH_RUN;
                t_traffic = now;
                t_meas0 = now;
                t_meas1 = now + (uint64_t)(cfg.duration * 1e9);
                announce_traffic();
                t_s0 = now;
                lg0 = self_cpu_s(); sy0 = sys_sample();
                srv0 = servers_sample();
            }
            break;
        }
        case PH_RUN:
            if (cfg.mode == M_CHAT) {
                chat_pump(now);
                if (now - last_check > 100000000ull) { chat_stall_check(now); last_check = now; }
            }
            if (cfg.mode != M_HOLD && t_s0 == 0 && now >= t_meas0) {
                t_s0 = now; lg0 = self_cpu_s(); sy0 = sys_sample(); srv0 = servers_sample();
                aux0 = proc_sample(cfg.aux_pid);
            }
            if (now >= t_meas1) {
                t_s1 = now; lg1 = self_cpu_s(); sy1 = sys_sample(); srv1 = servers_sample();
                aux1 = proc_sample(cfg.aux_pid);
                if (cfg.mode == M_HOLD) slab1 = slab_kb();
                if (cfg.mode == M_CHAT) {
                    phase = PH_DRAIN;
                    t_end_deadline = now + (uint64_t)(cfg.drain * 1e9);
                } else phase = PH_DONE;
            }
            break;
        case PH_DRAIN: {
            int pending = 0;
            for (int k = 0; k < nsnd; k++) { chat_advance(&snd[k]); if (snd[k].tail < snd[k].next_seq) pending = 1; }
            if (!pending || now >= t_end_deadline) phase = PH_DONE;
            break;
        }
        }
    }

    /* ---------------- report ---------------- */
    double win = t_s1 > t_s0 ? (t_s1 - t_s0) / 1e9 : cfg.duration;
    double mwin = t_meas1 != UINT64_MAX && t_meas1 > t_meas0 ? (t_meas1 - t_meas0) / 1e9 : cfg.duration;
    double lgcpu = win > 0 ? 100.0 * (lg1 - lg0) / win : 0;
    double srvcpu = (srv0.ok && srv1.ok && win > 0) ? 100.0 * (srv1.cpu_s - srv0.cpu_s) / win : -1;
    double auxcpu = (aux0.ok && aux1.ok && win > 0) ? 100.0 * (aux1.cpu_s - aux0.cpu_s) / win : -1;
    unsigned long long dtot = sy1.tot - sy0.tot;
    double sys_busy = dtot ? 100.0 * (double)(dtot - (sy1.idle - sy0.idle)) / (double)dtot : -1;
    double sys_si = dtot ? 100.0 * (double)(sy1.si - sy0.si) / (double)dtot : -1;
    int open_end = 0;
    for (int i = 0; i < nconns; i++) if (conns[i].state == CS_OPEN) open_end++;
    char errstr[64] = "none";
    if (st.first_errno) snprintf(errstr, sizeof errstr, "%s", strerrorname_np(st.first_errno) ? strerrorname_np(st.first_errno) : "?");

    if (cfg.mode == M_ECHO) {
        uint64_t cmin = UINT64_MAX, cmax = 0; int active = 0;
        uint64_t tend = now_ns(), lim = (uint64_t)(cfg.stall * 1e9);
        for (int i = 0; i < nconns; i++) {   /* lines never answered */
            conn_t *c = &conns[i];
            if (c->state == CS_OPEN && c->next_send > c->next_recv &&
                tend - c->tsend[c->next_recv & ring_mask] > lim) st.stalled++;
        }
        for (int i = 0; i < nconns; i++) {
            if (conns[i].state == CS_IDLE || conns[i].state == CS_FAILED) continue;
            uint64_t v = conns[i].lines_meas;
            if (v < cmin) cmin = v;
            if (v > cmax) cmax = v;
            if (v) active++;
        }
        if (cmin == UINT64_MAX) cmin = 0;
        double lps = st.lines / mwin;
        double mbps = lps * cfg.size / 1e6;
        uint64_t errors = st.conn_fail + st.closed + st.mismatch + st.unexpected + st.overlong + st.stalled + st.barrier_missing;
        printf("echo: %d/%d connections established (%.2fs), all answered after %.2fs more (%llu never did), depth %d, %d-byte lines, %.1fs measured\n",
               (int)st.est, nconns, st.connect_s, st.barrier_s, (unsigned long long)st.barrier_missing, cfg.depth, cfg.size, mwin);
        printf("  %.0f lines/s round-trip, %.2f MB/s each way; latency us p50 %.1f p90 %.1f p99 %.1f p99.9 %.1f max %.1f\n",
               lps, mbps, h_pct_us(&hist, .5), h_pct_us(&hist, .9), h_pct_us(&hist, .99),
               h_pct_us(&hist, .999), hist.max / 1000.0);
        printf("  per-conn lines min %llu max %llu, active %d; errors %llu (connect %llu, closed %llu, mismatch %llu, unexpected %llu, overlong %llu, stalled conns %llu)\n",
               (unsigned long long)cmin, (unsigned long long)cmax, active, (unsigned long long)errors,
               (unsigned long long)st.conn_fail, (unsigned long long)st.closed, (unsigned long long)st.mismatch,
               (unsigned long long)st.unexpected, (unsigned long long)st.overlong, (unsigned long long)st.stalled);
        printf("  cpu: loadgen %.0f%%, server %.0f%% (%d procs), machine busy %.0f%% (softirq %.0f%%), server rss %ld kB\n",
               lgcpu, srvcpu, srv1.nprocs, sys_busy, sys_si, srv1.rss_kb);
        printf("RESULT mode=echo label=%s conns=%d established=%llu active=%d size=%d depth=%d secs=%.2f "
               "lines=%llu lines_per_s=%.0f mb_per_s=%.2f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f "
               "conn_min=%llu conn_max=%llu errors=%llu connect_fail=%llu closed=%llu mismatch=%llu unexpected=%llu stalled=%llu "
               "barrier_missing=%llu connect_s=%.2f barrier_s=%.2f "
               "first_errno=%s lg_cpu=%.0f srv_cpu=%.0f sys_busy=%.0f sys_si=%.0f srv_procs=%d srv_rss_kb=%ld\n",
               cfg.label[0] ? cfg.label : "-", nconns, (unsigned long long)st.est, active, cfg.size, cfg.depth, mwin,
               (unsigned long long)st.lines, lps, mbps, h_pct_us(&hist, .5), h_pct_us(&hist, .9),
               h_pct_us(&hist, .99), h_pct_us(&hist, .999), hist.max / 1000.0,
               (unsigned long long)cmin, (unsigned long long)cmax, (unsigned long long)errors,
               (unsigned long long)st.conn_fail, (unsigned long long)st.closed, (unsigned long long)st.mismatch,
               (unsigned long long)st.unexpected, (unsigned long long)st.stalled,
               (unsigned long long)st.barrier_missing, st.connect_s, st.barrier_s, errstr, lgcpu, srvcpu, sys_busy, sys_si, srv1.nprocs, srv1.rss_kb);
        return errors ? 1 : 0;
    }
    if (cfg.mode == M_CHAT) {
        uint64_t lost_end = 0, sent = 0, sent_meas = 0, nexp = 0;
        int active_s = 0;
        for (int k = 0; k < nsnd; k++) {
            sender_t *s = &snd[k];
            for (uint64_t q = s->tail; q < s->next_seq; q++) {
                slot_t *sl = &s->ring[q & s->rmask];
                if (sl->seq == q && sl->remaining > 0) lost_end += (uint64_t)sl->remaining;
            }
            sent += s->sent_total; sent_meas += s->sent_meas;
            if (s->active) { active_s++; nexp = s->nexp; }
        }
        st.lost_end = lost_end;
        uint64_t lost = st.lost_gap + st.lost_stall + st.lost_end;
        uint64_t errors = st.conn_fail + st.closed + lost + st.garbled + st.dup + st.overlong + st.sync_missing;
        double dps = st.deliv_meas / mwin;
        printf("chat: %d/%d connections established (%.2fs), %d senders (%d active) -> %llu receivers each, %d-byte lines, %s\n",
               (int)st.est, nconns, st.connect_s, nsnd, active_s, (unsigned long long)nexp, cfg.size,
               cfg.rate > 0 ? "open loop" : "closed loop");
        printf("  sent %.0f lines/s, delivered %.0f lines/s (fan-out deliveries); latency us p50 %.1f p90 %.1f p99 %.1f p99.9 %.1f max %.1f\n",
               sent_meas / mwin, dps, h_pct_us(&hist, .5), h_pct_us(&hist, .9), h_pct_us(&hist, .99),
               h_pct_us(&hist, .999), hist.max / 1000.0);
        printf("  sent %llu lines in total, deliveries %llu; lost %llu (gap %llu, stall %llu, end %llu), garbled %llu, dup %llu, foreign %llu, self-echo %llu, sync-missing %llu, closed %llu\n",
               (unsigned long long)sent, (unsigned long long)st.deliv_total, (unsigned long long)lost,
               (unsigned long long)st.lost_gap, (unsigned long long)st.lost_stall, (unsigned long long)st.lost_end,
               (unsigned long long)st.garbled, (unsigned long long)st.dup, (unsigned long long)st.foreign,
               (unsigned long long)st.self_echo, (unsigned long long)st.sync_missing, (unsigned long long)st.closed);
        printf("  cpu: loadgen %.0f%%, server %.0f%% (%d procs), machine busy %.0f%% (softirq %.0f%%), server rss %ld kB\n",
               lgcpu, srvcpu, srv1.nprocs, sys_busy, sys_si, srv1.rss_kb);
        if (cfg.conns2)
            printf("  %d receivers on %s:%d, %d on %s:%d; aux cpu %.0f%%\n", cfg.conns - cfg.conns2, cfg.host, cfg.port,
                   cfg.conns2, cfg.host2, cfg.port2, auxcpu);
        printf("RESULT mode=chat label=%s receivers=%d senders=%d established=%llu fanout=%llu size=%d secs=%.2f rate=%.0f window=%d "
               "sent_per_s=%.0f lines_per_s=%.0f deliveries=%llu p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f "
               "lost=%llu garbled=%llu dup=%llu foreign=%llu self_echo=%llu sync_missing=%llu closed=%llu errors=%llu "
               "first_errno=%s lg_cpu=%.0f srv_cpu=%.0f sys_busy=%.0f sys_si=%.0f srv_procs=%d srv_rss_kb=%ld "
               "receivers2=%d aux_cpu=%.0f\n",
               cfg.label[0] ? cfg.label : "-", cfg.conns, nsnd, (unsigned long long)st.est, (unsigned long long)nexp,
               cfg.size, mwin, cfg.rate, cfg.window, sent_meas / mwin, dps, (unsigned long long)st.deliv_meas,
               h_pct_us(&hist, .5), h_pct_us(&hist, .9), h_pct_us(&hist, .99), h_pct_us(&hist, .999), hist.max / 1000.0,
               (unsigned long long)lost, (unsigned long long)st.garbled, (unsigned long long)st.dup,
               (unsigned long long)st.foreign, (unsigned long long)st.self_echo, (unsigned long long)st.sync_missing,
               (unsigned long long)st.closed, (unsigned long long)errors, errstr, lgcpu, srvcpu, sys_busy, sys_si, srv1.nprocs, srv1.rss_kb,
               cfg.conns2, auxcpu);
        return errors ? 1 : 0;
    }
    /* hold */
    long drss = (srvH0.ok && srv1.ok) ? srv1.rss_kb - srvH0.rss_kb : 0;
    long dpss = (srvH0.ok && srv1.ok && cfg.pss) ? srv1.pss_kb - srvH0.pss_kb : 0;
    double per = open_end ? drss * 1024.0 / open_end : 0;
    double perp = open_end ? dpss * 1024.0 / open_end : 0;
    printf("hold: %d requested, %llu established (%.2fs), %llu failed (%llu timed out, %llu never attempted before the deadline), %llu closed by server, %d open at end after %.1fs\n",
           nconns, (unsigned long long)st.est, st.connect_s, (unsigned long long)st.conn_fail,
           (unsigned long long)st.conn_timeout, (unsigned long long)st.not_attempted, (unsigned long long)st.closed, open_end, mwin);
    if (cfg.probe) printf("  probe: %llu echoed correctly, %llu bad\n", (unsigned long long)st.probe_ok, (unsigned long long)st.probe_bad);
    printf("  server: rss %ld kB -> %ld kB (%+.0f B/conn), procs %d -> %d%s\n",
           srvH0.rss_kb, srv1.rss_kb, per, srvH0.nprocs, srv1.nprocs, cfg.pss ? "" : "");
    if (cfg.pss) printf("  server pss %ld kB -> %ld kB (%+.0f B/conn)\n", srvH0.pss_kb, srv1.pss_kb, perp);
    double slabper = open_end ? (slab1 - slab0) * 1024.0 / open_end : 0;
    printf("  kernel slab %+ld kB (%+.0f B/conn, both ends of each connection, machine-wide)\n", slab1 - slab0, slabper);
    printf("RESULT mode=hold label=%s conns=%d established=%llu connect_fail=%llu connect_timeout=%llu closed=%llu open_end=%d "
           "probe=%d probe_ok=%llu secs=%.2f connect_s=%.2f srv_rss0_kb=%ld srv_rss1_kb=%ld rss_per_conn_b=%.0f "
           "srv_pss0_kb=%ld srv_pss1_kb=%ld pss_per_conn_b=%.0f slab_per_conn_b=%.0f srv_procs=%d first_errno=%s srv_cpu=%.0f\n",
           cfg.label[0] ? cfg.label : "-", nconns, (unsigned long long)st.est, (unsigned long long)st.conn_fail,
           (unsigned long long)st.conn_timeout, (unsigned long long)st.closed, open_end, cfg.probe,
           (unsigned long long)st.probe_ok, mwin, st.connect_s, srvH0.rss_kb, srv1.rss_kb, per,
           srvH0.pss_kb, srv1.pss_kb, perp, slabper, srv1.nprocs, errstr, srvcpu);
    return (open_end == nconns) ? 0 : 1;
}
