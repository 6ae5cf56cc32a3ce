/*
 * The reference client of scripts/bench-client: a pipelined memcached client in C on raw
 * sockets, doing what memcached-bench does with ours (the same keys, values, meta commands,
 * connections and requests in flight), with nothing else in the way: one thread, poll(2), each
 * connection a closed loop of batches of DEPTH commands (written in one write, read back in full
 * before the next batch). DEPTH = concurrency / connections; at concurrency 1 one connection.
 *
 *   refclient --server 127.0.0.1:11211 --op get|set --concurrency 16 --duration 10 --keys 16384
 *             [--connections 2] [--key-size 48] [--value-size 1100] [--populate no]
 *
 * Prints `RESULT op=... concurrency=... connections=... ops=... seconds=... ops_per_s=...
 * misses=... errors=...` (the benchmark reads memcached's own counters, not this figure).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MAX_CONNECTIONS = 64 };

struct connection {
    int fd;
    char *out;          /* the batch being written */
    size_t out_len, out_sent;
    char *in;           /* replies read, not yet parsed */
    size_t in_len, in_cap;
    int pending;        /* replies still expected for the batch */
    size_t next_key;
};

static const char *op = "get";
static int concurrency = 16, connections = 2, key_size = 48, value_size = 1100, populate = 1;
static double duration = 10;
static size_t keys = 10000;
static char **key_names;
static char *value;
static long long ops, misses, errors;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int connect_to(const char *server) {
    char host[256];
    const char *colon = strrchr(server, ':');
    if (!colon || (size_t)(colon - server) >= sizeof host) {
        fprintf(stderr, "--server HOST:PORT\n");
        exit(2);
    }
    memcpy(host, server, colon - server);
    host[colon - server] = 0;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1) {
        fprintf(stderr, "--server wants an IPv4 address\n");
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void append(struct connection *c, const char *bytes, size_t length) {
    memcpy(c->out + c->out_len, bytes, length);
    c->out_len += length;
}

/* One batch of `depth` commands into c->out. */
static void fill_batch(struct connection *c, int depth, int is_set) {
    char line[512];
    c->out_len = c->out_sent = 0;
    for (int i = 0; i < depth; i++) {
        const char *key = key_names[c->next_key];
        c->next_key = (c->next_key + 1) % keys;
        int n = is_set ? snprintf(line, sizeof line, "ms %s %d\r\n", key, value_size)
                       : snprintf(line, sizeof line, "mg %s v f\r\n", key);
        append(c, line, n);
        if (is_set) {
            append(c, value, value_size);
            append(c, "\r\n", 2);
        }
    }
    c->pending = depth;
}

/* Parses complete replies from c->in; returns how many. */
static int parse(struct connection *c) {
    int parsed = 0;
    size_t at = 0;
    while (at < c->in_len) {
        char *start = c->in + at;
        char *end = memmem(start, c->in_len - at, "\r\n", 2);
        if (!end) break;
        size_t line = end - start + 2;
        if (start[0] == 'V' && start[1] == 'A') {
            long length = strtol(start + 3, NULL, 10);
            if (at + line + length + 2 > c->in_len) break;
            at += line + length + 2;
        } else {
            if (start[0] == 'E' && start[1] == 'N') misses++;
            else if (!(start[0] == 'H' && start[1] == 'D')) errors++;
            at += line;
        }
        parsed++;
    }
    memmove(c->in, c->in + at, c->in_len - at);
    c->in_len -= at;
    return parsed;
}

static void run(struct connection *conns, int count, int depth, int is_set, double deadline, int counting) {
    struct pollfd fds[MAX_CONNECTIONS];
    int active = count;
    for (int i = 0; i < count; i++) fill_batch(&conns[i], depth, is_set);
    int stopping = 0;
    while (active > 0) {
        for (int i = 0; i < count; i++) {
            fds[i].fd = conns[i].pending > 0 ? conns[i].fd : -1;
            fds[i].events = conns[i].out_sent < conns[i].out_len ? POLLIN | POLLOUT : POLLIN;
            fds[i].revents = 0;
        }
        if (poll(fds, count, 1000) < 0 && errno != EINTR) die("poll");
        for (int i = 0; i < count; i++) {
            struct connection *c = &conns[i];
            if (c->pending == 0) continue;
            if (fds[i].revents & POLLOUT && c->out_sent < c->out_len) {
                ssize_t n = write(c->fd, c->out + c->out_sent, c->out_len - c->out_sent);
                if (n < 0 && errno != EAGAIN) die("write");
                if (n > 0) c->out_sent += n;
            }
            if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
                if (c->in_cap - c->in_len < 65536) {
                    c->in_cap *= 2;
                    c->in = realloc(c->in, c->in_cap);
                }
                ssize_t n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
                if (n == 0) {
                    fprintf(stderr, "the server closed the connection\n");
                    exit(1);
                }
                if (n < 0 && errno != EAGAIN) die("read");
                if (n > 0) {
                    c->in_len += n;
                    int done = parse(c);
                    c->pending -= done;
                    if (counting) ops += done;
                    if (c->pending == 0) {
                        if (!stopping && now() >= deadline) stopping = 1;
                        if (stopping) active--;
                        else fill_batch(c, depth, is_set);
                    }
                }
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *server = "127.0.0.1:11211";
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *flag = argv[i], *v = argv[i + 1];
        if (!strcmp(flag, "--server")) server = v;
        else if (!strcmp(flag, "--op")) op = v;
        else if (!strcmp(flag, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(flag, "--connections")) connections = atoi(v);
        else if (!strcmp(flag, "--duration")) duration = atof(v);
        else if (!strcmp(flag, "--keys")) keys = strtoul(v, NULL, 10);
        else if (!strcmp(flag, "--key-size")) key_size = atoi(v);
        else if (!strcmp(flag, "--value-size")) value_size = atoi(v);
        else if (!strcmp(flag, "--populate")) populate = strcmp(v, "no") != 0;
        else {
            fprintf(stderr, "unknown option %s\n", flag);
            return 2;
        }
    }
    int is_set = !strcmp(op, "set");
    if (concurrency < 1 || keys < 1 || key_size < 8 || key_size > 250 || value_size < 0) {
        fprintf(stderr, "bad options\n");
        return 2;
    }
    if (connections > concurrency) connections = concurrency;
    if (connections < 1 || connections > MAX_CONNECTIONS) connections = 1;
    int depth = concurrency / connections;
    /* The same keys as memcached-bench: "bench:" and the index, zero-padded to key_size. */
    key_names = malloc(keys * sizeof *key_names);
    for (size_t i = 0; i < keys; i++) {
        key_names[i] = malloc(key_size + 1);
        char digits[32];
        int n = snprintf(digits, sizeof digits, "%zu", i);
        int zeros = key_size - 6 - n;
        memcpy(key_names[i], "bench:", 6);
        memset(key_names[i] + 6, '0', zeros > 0 ? zeros : 0);
        memcpy(key_names[i] + 6 + (zeros > 0 ? zeros : 0), digits, n + 1);
    }
    value = malloc(value_size + 1);
    memset(value, 'v', value_size);
    struct connection conns[MAX_CONNECTIONS];
    size_t batch_bytes = (size_t)depth * (key_size + value_size + 64) + 1024;
    size_t populate_depth = 500;
    size_t populate_bytes = populate_depth * (key_size + value_size + 64) + 1024;
    for (int i = 0; i < connections; i++) {
        conns[i].fd = connect_to(server);
        conns[i].out = malloc(batch_bytes > populate_bytes ? batch_bytes : populate_bytes);
        conns[i].in_cap = 1 << 20;
        conns[i].in = malloc(conns[i].in_cap);
        conns[i].in_len = 0;
        /* Each connection starts at its own place in the keys, as memcached-bench's workers do. */
        conns[i].next_key = ((size_t)i * depth * 7919) % keys;
    }
    if (populate) {
        /* Every key once, in batches of 500 on the first connection (not timed). */
        struct connection *c = &conns[0];
        size_t start = c->next_key;
        c->next_key = 0;
        for (size_t done = 0; done < keys; done += populate_depth) {
            int n = (int)(keys - done < populate_depth ? keys - done : populate_depth);
            run(c, 1, n, 1, 0, 0);
        }
        c->next_key = start;
        misses = errors = 0;
    }
    double begin = now();
    run(conns, connections, depth, is_set, begin + duration, 1);
    double seconds = now() - begin;
    printf("RESULT op=%s concurrency=%d executor=c connections=%d ops=%lld seconds=%.3f ops_per_s=%lld misses=%lld errors=%lld\n",
           op, concurrency, connections, ops, seconds, (long long)(ops / seconds), misses, errors);
    return 0;
}
