/*
 * ref_epoll_echo.c - minimal single-threaded epoll line server, the
 * "physical limit" reference for one core (chatd's benchmark: tests/perf/bench.py).
 *
 *   ref_epoll_echo [-p PORT] [-m echo|chat] [-x]
 *
 * echo: every complete '\n'-terminated line is written back to its sender
 *       (partial lines are buffered until their newline arrives).
 * chat: every complete line is written to every *other* connection;
 *       -x prefixes each broadcast line with "<userN> " (like ncat --chat).
 * Listens on 127.0.0.1 only.  Level-triggered epoll, non-blocking sockets,
 * TCP_NODELAY, per-connection output buffer with back-pressure (echo: stop
 * reading while >1 MiB is queued; chat: drop a receiver with >16 MiB queued).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct {
    int fd, live, reading, epout, slot, user;
    char *in; size_t inlen, incap;
    char *out; size_t outoff, outlen, outcap;
} cx_t;

static cx_t **byfd;
static int maxfd;
static int *live; static int nlive;   /* dense list of live fds (chat) */
static int ep, chat, prefix;
static int next_user = 1;
static volatile sig_atomic_t stop;

#define ECHO_HIGH (1u << 20)
#define CHAT_DROP (16u << 20)

static void on_sig(int s) { (void)s; stop = 1; }

static void set_events(cx_t *c)
{
    uint32_t ev = (c->reading ? EPOLLIN : 0) | (c->outlen > c->outoff ? EPOLLOUT : 0);
    int want_out = (ev & EPOLLOUT) != 0;
    struct epoll_event e = { .events = ev | EPOLLRDHUP, .data.fd = c->fd };
    (void)want_out;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void cx_close(cx_t *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    byfd[c->fd] = NULL;
    if (chat) {
        int last = live[--nlive];
        live[c->slot] = last;
        byfd[last] ? (byfd[last]->slot = c->slot) : 0;
    }
    free(c->in); free(c->out); free(c);
}

/* queue or write; returns -1 if the connection died */
static int cx_send(cx_t *c, const char *p, size_t n)
{
    if (c->outlen == c->outoff) {
        c->outlen = c->outoff = 0;
        while (n) {
            ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w > 0) { p += w; n -= (size_t)w; continue; }
            if (w < 0 && errno == EINTR) continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            return -1;
        }
        if (!n) return 0;
    }
    if (c->outlen + n > c->outcap) {
        if (c->outoff) {
            memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
            c->outlen -= c->outoff; c->outoff = 0;
        }
        if (c->outlen + n > c->outcap) {
            size_t nc = c->outcap ? c->outcap : 4096;
            while (nc < c->outlen + n) nc *= 2;
            c->out = realloc(c->out, nc);
            c->outcap = nc;
        }
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
    if (!c->epout) { c->epout = 1; set_events(c); }
    return 0;
}

static int cx_flush(cx_t *c)
{
    while (c->outoff < c->outlen) {
        ssize_t w = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (w > 0) { c->outoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    c->outoff = c->outlen = 0;
    c->epout = 0;
    if (!c->reading) c->reading = 1;
    set_events(c);
    return 0;
}

static void broadcast(cx_t *from, const char *p, size_t n)
{
    char *tmp = NULL;
    if (prefix) {
        /* rebuild the chunk with "<userN> " in front of every line */
        char pre[32];
        int pl = snprintf(pre, sizeof pre, "<user%d> ", from->user);
        size_t lines = 0;
        for (size_t i = 0; i < n; i++) if (p[i] == '\n') lines++;
        tmp = malloc(n + lines * (size_t)pl);
        size_t o = 0; const char *s = p, *e = p + n;
        while (s < e) {
            const char *nl = memchr(s, '\n', (size_t)(e - s));
            size_t L = (size_t)(nl - s) + 1;
            memcpy(tmp + o, pre, (size_t)pl); o += (size_t)pl;
            memcpy(tmp + o, s, L); o += L;
            s = nl + 1;
        }
        p = tmp; n = o;
    }
    for (int i = 0; i < nlive; i++) {
        cx_t *c = byfd[live[i]];
        if (!c || c == from) continue;
        if (cx_send(c, p, n) < 0 || c->outlen - c->outoff > CHAT_DROP) {
            cx_close(c);
            i--;                 /* slot i now holds another fd */
        }
    }
    free(tmp);
}

static char rxbuf[65536];

static void keep(cx_t *c, const char *p, size_t n)   /* store a partial line */
{
    if (n > (1u << 20)) n = 0;                       /* absurd line: discard */
    if (c->incap < n) { c->incap = n < 256 ? 256 : n * 2; c->in = realloc(c->in, c->incap); }
    if (p != c->in) memmove(c->in, p, n);
    c->inlen = n;
}

static void on_read(cx_t *c)
{
    ssize_t r = recv(c->fd, rxbuf, sizeof rxbuf, 0);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR && errno != EWOULDBLOCK)) { cx_close(c); return; }
    if (r < 0) return;
    char *data = rxbuf; size_t len = (size_t)r;
    if (c->inlen) {                                  /* rare: previous partial line */
        if (c->incap < c->inlen + len) { c->incap = (c->inlen + len) * 2; c->in = realloc(c->in, c->incap); }
        memcpy(c->in + c->inlen, rxbuf, len);
        data = c->in; len += c->inlen; c->inlen = 0;
    }
    char *lastnl = memrchr(data, '\n', len);
    if (!lastnl) { keep(c, data, len); return; }
    size_t done = (size_t)(lastnl - data) + 1;
    if (chat) {
        broadcast(c, data, done);
    } else {
        if (cx_send(c, data, done) < 0) { cx_close(c); return; }
    }
    if (len > done) keep(c, data + done, len - done);
    if (!chat && c->outlen - c->outoff > ECHO_HIGH) { c->reading = 0; set_events(c); }
}

int main(int argc, char **argv)
{
    int port = 7000, o;
    while ((o = getopt(argc, argv, "p:m:x")) != -1) {
        if (o == 'p') port = atoi(optarg);
        else if (o == 'm') chat = !strcmp(optarg, "chat");
        else if (o == 'x') prefix = 1;
        else { fprintf(stderr, "usage: %s [-p PORT] [-m echo|chat] [-x]\n", argv[0]); return 2; }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_sig);
    signal(SIGINT, on_sig);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    maxfd = (int)rl.rlim_cur + 1;
    byfd = calloc((size_t)maxfd, sizeof *byfd);
    live = calloc((size_t)maxfd, sizeof *live);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); return 1; }
    if (listen(ls, 4096) < 0) { perror("listen"); return 1; }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = { .events = EPOLLIN, .data.fd = ls };
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    fprintf(stderr, "ref_epoll_echo: %s on 127.0.0.1:%d%s\n", chat ? "chat" : "echo", port,
            prefix ? " (prefix)" : "");

    struct epoll_event evs[1024];
    while (!stop) {
        int n = epoll_wait(ep, evs, 1024, 500);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    if (cfd >= maxfd) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    cx_t *c = calloc(1, sizeof *c);
                    c->fd = cfd; c->reading = 1; c->user = next_user++;
                    byfd[cfd] = c;
                    if (chat) { c->slot = nlive; live[nlive++] = cfd; }
                    struct epoll_event ce = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = cfd };
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ce);
                }
                continue;
            }
            cx_t *c = byfd[fd];
            if (!c) continue;
            uint32_t ev = evs[i].events;
            if (ev & EPOLLOUT) {
                if (cx_flush(c) < 0) { cx_close(c); continue; }
            }
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                if (c->reading || (ev & (EPOLLHUP | EPOLLERR))) on_read(c);
            }
        }
    }
    return 0;
}
