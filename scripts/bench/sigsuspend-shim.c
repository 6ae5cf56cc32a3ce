#define _GNU_SOURCE
#include <signal.h>
#include <unistd.h>
#include <sys/syscall.h>
/* Preloaded under valgrind (scripts/bench/instructions.py): valgrind 3.19's rt_sigsuspend
   wrapper writes to the mask it is given, and libdispatch's
   dispatch_main passes a const mask in read-only memory. Hand it a writable copy. */
int sigsuspend(const sigset_t *mask) {
    sigset_t copy = *mask;
    return (int)syscall(SYS_rt_sigsuspend, &copy, 8);
}
