/*
 * The hardware floor: QEMU's per-notification algorithm in C on a shared
 * mapping of a guest RAM file (hw/s390x/virtio-ccw.c, virtio_set_ind_atomic):
 * a 1-byte compare-and-swap OR loop on the DSCI byte, another on the summary
 * byte, and an interrupt decision when the summary byte was 0.
 *
 *   qemu_floor RAMFILE SIZE SUMMARY DSCI DEVICES VECTORS BURST SECONDS
 *
 * Prints: notifications per second, as one JSON object.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint8_t or_byte(uint8_t *p, uint8_t mask)
{
    uint8_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old | mask, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
    return old;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: %s RAMFILE SIZE SUMMARY DSCI DEVICES VECTORS BURST SECONDS\n", argv[0]);
        return 2;
    }
    size_t size = strtoull(argv[2], NULL, 0);
    uint64_t summary = strtoull(argv[3], NULL, 0), dsci = strtoull(argv[4], NULL, 0);
    int devices = atoi(argv[5]), vectors = atoi(argv[6]), burst = atoi(argv[7]);
    double seconds = atof(argv[8]);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    int bytes_per_device = (vectors + 7) / 8;
    long done = 0, interrupts = 0;
    double start = now();
    while (now() - start < seconds) {
        memset(mem + summary, 0, dsci - summary + (size_t)devices * bytes_per_device);
        for (int i = 0; i < burst; i++) {
            int device = i % devices, bit = (i / devices) % vectors;
            uint8_t *ind = mem + dsci + device * bytes_per_device + bit / 8;
            or_byte(ind, 0x80 >> (bit % 8));
            if (or_byte(mem + summary + device / 8, 0x01) == 0)
                interrupts++;
        }
        done += burst;
    }
    double elapsed = now() - start;
    printf("{\"per_second\": %.1f, \"notifications\": %ld, \"interrupts\": %ld}\n",
           done / elapsed, done, interrupts);
    return 0;
}
