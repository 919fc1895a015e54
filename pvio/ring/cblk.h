
/* blkback's fast path (cblk.c): READ and WRITE requests, direct or INDIRECT. */
typedef struct {
    uint8_t *table;        /* the frontend's grant table */
    uint32_t nr_grants;
    uint16_t domid;        /* ours: every grant must name it */
    uint8_t *pool;         /* the frontend's guest memory */
    uint32_t pool_frames;
    uint32_t *rd_pins;     /* the GrantMapper's pin counts */
    uint32_t *wr_pins;
    int fd;                /* the image */
    uint64_t disk_bytes;
    uint32_t sector_size;
    int readonly;
    uint32_t max_indirect; /* feature-max-indirect-segments advertised */
    int read_flags;        /* preadv2 flags, or -1: reads are not done inline */
    int write_flags;       /* pwritev2 flags, or -1: writes are not done inline */
    uint64_t counters[4];  /* reads, bytes read, writes, bytes written */
} pvio_blk_ctx;

/* Why pvio_blk_serve stopped before the end of the batch. */
#define PVIO_BLK_NOT_FAST 1     /* another operation, or invalid: the reference path */
#define PVIO_BLK_WOULD_BLOCK 2  /* the I/O would wait for the device: a worker thread */

uint32_t pvio_blk_serve(pvio_blk_ctx *ctx, const uint8_t *reqs, uint32_t first, uint32_t n,
                        uint8_t *rsps, int *why);
/* 1 if fd's file lives in memory (tmpfs, ramfs): its I/O never waits for a
 * device, so it is done inline without RWF_NOWAIT (which tmpfs refuses). */
int pvio_fd_in_memory(int fd);
