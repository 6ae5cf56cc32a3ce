/* Prints the server libmemcached's weighted ketama picks for keys key-0 .. key-(N-1).
 * Regenerates Tests/MemcachedTests/Fixtures/ketama-libmemcached.txt:
 *   cc -o /tmp/ketama-reference ketama-reference.c -lmemcached && /tmp/ketama-reference 2000 > ../../Tests/MemcachedTests/Fixtures/ketama-libmemcached.txt
 * Servers: 127.0.0.1:21211, 127.0.0.1:21212, 127.0.0.1:21213, then the same three plus 10.0.0.4:11211.
 * Output lines: "<servers> <key> <server index>" */
#include <libmemcached/memcached.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void run(int servers, int count) {
    memcached_st *mc = memcached_create(NULL);
    memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED, 1);
    memcached_server_add(mc, "127.0.0.1", 21211);
    memcached_server_add(mc, "127.0.0.1", 21212);
    memcached_server_add(mc, "127.0.0.1", 21213);
    if (servers == 4) memcached_server_add(mc, "10.0.0.4", 11211);
    char key[64];
    for (int i = 0; i < count; i++) {
        int len = snprintf(key, sizeof key, "key-%d", i);
        printf("%d %s %u\n", servers, key, memcached_generate_hash(mc, key, len));
    }
    memcached_free(mc);
}

int main(int argc, char **argv) {
    int count = argc > 1 ? atoi(argv[1]) : 1000;
    run(3, count);
    run(4, count);
    return 0;
}
