/* The native half of the FUSE view's request loop: OPEN and RELEASE of files passed through,
 * and READ of files the kernel opened itself.
 *
 * Why native (bench/ANALYSIS.md, 2026-12-06): with the page cache dropped, 15,000 files of
 * 60-160 KB read by 8 processes, libfuse's own C daemon answering every OPEN with
 * FOPEN_PASSTHROUGH reached 0.79-0.81 of local disk, the worker's Python answer 0.26: about
 * 300 us of Python per open and release. Every other request stays in Python (fastopen.py).
 *
 * What it does: each session thread calls dh_next() in place of epoll_wait + read. It reads
 * requests from /dev/fuse and answers, without returning:
 *   - OPEN (read-only) of an *armed* node id: FOPEN_PASSTHROUGH with the backing id Python
 *     registered and armed for it, after one stat(2) showing the cache file is still the one
 *     Python verified (the same check Python makes before reusing a kept id). The open is
 *     counted in the shared counter of the arm's slot *before* the reply (a crash in between
 *     leaves the count too high: the id is then never closed, the safe direction), and queued
 *     for hit accounting (node id, pid), which Python drains;
 *   - RELEASE of a handle it gave out (DH_NATIVE_FH set): the reply, then the count down;
 *   - LOOKUP of a name Python answered before (dh_remember): the same answer again. The view's
 *     names are immutable between refreshes (which clear them: dh_forget_names) and FORGET
 *     frees nothing there (node ids come from the index), so a remembered answer stays true.
 *     Measured: with the page cache dropped (dentries too), a LOOKUP answered in Python cost
 *     about 100 us of worker CPU per file, more than the open this part was written for.
 *   - READ with handle 0 (kernel opens: no OPEN reaches any daemon, fs.serve_opens_in_kernel)
 *     of a node id armed for reads only (backing id -1, no passthrough): the bytes from the
 *     cache file, checked on the descriptor read to be the one Python verified. Measured: such
 *     a read, past the page cache (a reboot, memory pressure), cost about 500 us of worker CPU
 *     per small file in Python, and kept that epoch at 0.31-0.34 of local disk.
 * Anything else (and an OPEN it cannot answer: not armed, file changed, event queue full) is
 * returned to Python in the caller's buffer, which then dispatches it as before.
 *
 * It also counts the opens fanotify reports with kernel opens (dh_count_fanotify, called by
 * open_watch.py's thread, not by a session thread): each names the opened file's node id, and
 * an armed id's entry holds its size. Measured (4,000 files of 60-160 KB on local disk, 8
 * readers, page cache warm, 2 cores): a watch whose events were read and thrown away cost the
 * readers nothing measurable (63.6k files/s best, against 63.7k with no watch), while counting
 * them in Python (parsing 1.9 us an event, then the index's sizes) took the best epoch to 51.9k.
 *
 * The counters live in a MAP_SHARED tmpfs mapping owned by Python (the backing table's
 * ".opens" file), so a restarted worker knows how many native handles of each slot the
 * kernel still holds, and its RELEASEs of them (which come to the new process) count down.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define OP_LOOKUP 1
#define OP_OPEN 14
#define OP_RELEASE 18
#define OP_READ 15
#define READ_MAX (1u << 20)  /* the view's max_read (fs.MAX_READ) */
#define ENTRY_OUT_MAX 256
#define FOPEN_NOFLUSH (1u << 5)
#define FOPEN_PASSTHROUGH (1u << 7)
#define DH_NATIVE_FH (1ull << 63)
#define DH_PREPAID_PASSED 3ull
#define DH_SLOT_SHIFT 2

struct in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid;
                   uint16_t total_extlen, padding; };
struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct open_in { uint32_t flags, open_flags; };
struct open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct release_in { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; };
struct read_in { uint64_t fh, offset; uint32_t size, read_flags; uint64_t lock_owner;
                 uint32_t flags, padding; };

struct entry {            /* one armed node id; nodeid 0: empty, DH_TOMB: deleted */
    uint64_t nodeid;
    int32_t backing_id;
    uint32_t slot;
    uint64_t ino, size, mtime_ns, ctime_ns;
    char *path;
};
#define DH_TOMB UINT64_MAX
#define TABLE_MIN 1024

struct event { uint64_t nodeid; uint64_t pid; };

/* One remembered LOOKUP answer: blob = the name's bytes, then the fuse_entry_out Python sent. */
struct lentry { uint64_t parent, hash; char *blob; uint32_t namelen, replylen; };

struct dh {
    int fd;
    uint64_t *counts;     /* per slot, in Python's shared mapping */
    uint32_t nslots;
    pthread_rwlock_t lock;
    struct entry *table;  /* open addressing, capacity a power of two, at most half used */
    size_t cap, used, tombs;
    pthread_mutex_t qlock;
    struct event *queue;
    size_t qcap, qhead, qlen;
    uint64_t stats[7];    /* opens, releases answered; opens forwarded; changed files; lookups;
                             reads answered (of files the kernel opened itself); kernel opens
                             counted (dh_count_fanotify) */
    pthread_rwlock_t llock;
    struct lentry *names; /* open addressing, no deletions: cleared whole (dh_forget_names) */
    size_t ncap, nused, nmax;
    uint64_t epoch;       /* raised by every clear: an answer looked up before it is refused */
};

static size_t hash(uint64_t k, size_t cap) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdull; k ^= k >> 33;
    return (size_t)k & (cap - 1);
}

struct dh *dh_new(int fd, uint64_t *counts, uint32_t nslots, uint32_t queue_cap, uint32_t max_names) {
    struct dh *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->fd = fd; d->counts = counts; d->nslots = nslots;
    d->cap = TABLE_MIN;  /* grows with the arms (rehash), not with the bound: see dh_arm */
    d->table = calloc(d->cap, sizeof *d->table);
    d->qcap = queue_cap ? queue_cap : 1;
    d->queue = calloc(d->qcap, sizeof *d->queue);
    d->nmax = max_names;
    d->ncap = 16;
    while (d->ncap < 2 * (size_t)max_names + 16) d->ncap <<= 1;
    d->names = calloc(d->ncap, sizeof *d->names);
    if (!d->table || !d->queue || !d->names) {
        free(d->table); free(d->queue); free(d->names); free(d); return NULL;
    }
    pthread_rwlock_init(&d->lock, NULL);
    pthread_rwlock_init(&d->llock, NULL);
    pthread_mutex_init(&d->qlock, NULL);
    return d;
}

void dh_free(struct dh *d) {
    if (!d) return;
    for (size_t i = 0; i < d->cap; i++)
        if (d->table[i].nodeid && d->table[i].nodeid != DH_TOMB) free(d->table[i].path);
    for (size_t i = 0; i < d->ncap; i++) free(d->names[i].blob);
    free(d->table); free(d->queue); free(d->names); free(d);
}

/* The slot of nodeid's entry, or of the first free one (for insertion) when absent. */
static struct entry *find(struct dh *d, uint64_t nodeid, struct entry **free_slot) {
    struct entry *tomb = NULL;
    for (size_t i = hash(nodeid, d->cap), n = 0; n < d->cap; i = (i + 1) & (d->cap - 1), n++) {
        struct entry *e = &d->table[i];
        if (e->nodeid == nodeid) return e;
        if (e->nodeid == DH_TOMB) { if (!tomb) tomb = e; continue; }
        if (e->nodeid == 0) { if (free_slot) *free_slot = tomb ? tomb : e; return NULL; }
    }
    if (free_slot) *free_slot = tomb;
    return NULL;
}

/* Rebuild the table with newcap entries and without tombstones (under the write lock).
 * Growing: the bound is sized from the node's memory (passthrough_native.py: hundreds of
 * thousands of arms), and a table allocated for it up front would keep tens of MB resident
 * for a dataset of a few thousand files, the hash spreading even a few arms over every page.
 * Compacting (same size): arming and disarming past the bound leaves a tombstone per disarm,
 * and a probe for an absent node id (every open of a file not armed) runs until an empty slot,
 * so without this it would end up scanning the whole table. Returns -ENOMEM, else 0. */
static int rehash(struct dh *d, size_t newcap) {
    struct entry *old = d->table, *fresh = calloc(newcap, sizeof *fresh);
    size_t oldcap = d->cap;
    if (!fresh) return -ENOMEM;  /* compacting: slower probes, still correct */
    d->table = fresh;
    d->cap = newcap;
    for (size_t i = 0; i < oldcap; i++) {
        if (!old[i].nodeid || old[i].nodeid == DH_TOMB) continue;
        struct entry *slot = NULL;
        find(d, old[i].nodeid, &slot);
        *slot = old[i];
    }
    d->tombs = 0;
    free(old);
    return 0;
}

/* Arm nodeid: its read-only opens are answered with backing_id while path still has the
 * given identity. Returns 0, or -ENOSPC (table full), -ENOMEM, -EINVAL. */
int dh_arm(struct dh *d, uint64_t nodeid, int32_t backing_id, uint32_t slot, const char *path,
           uint64_t ino, uint64_t size, uint64_t mtime_ns, uint64_t ctime_ns) {
    if (nodeid == 0 || nodeid == DH_TOMB || slot >= d->nslots) return -EINVAL;
    char *copy = strdup(path);
    if (!copy) return -ENOMEM;
    pthread_rwlock_wrlock(&d->lock);
    struct entry *slot_free = NULL, *e = find(d, nodeid, &slot_free);
    if (!e) {
        if (d->used >= (size_t)d->nslots) {
            pthread_rwlock_unlock(&d->lock); free(copy); return -ENOSPC;
        }
        if (2 * (d->used + d->tombs + 1) > d->cap) {  /* keep it at most half full */
            size_t cap = d->cap;
            while (4 * (d->used + 1) > cap) cap <<= 1;
            if (rehash(d, cap) < 0 && 2 * (d->used + 1) > d->cap) {
                pthread_rwlock_unlock(&d->lock); free(copy); return -ENOMEM;
            }
            find(d, nodeid, &slot_free);
        }
        if (!slot_free) { pthread_rwlock_unlock(&d->lock); free(copy); return -ENOSPC; }
        if (slot_free->nodeid == DH_TOMB) d->tombs--;
        e = slot_free; d->used++;
    } else {
        free(e->path);
    }
    *e = (struct entry){nodeid, backing_id, slot, ino, size, mtime_ns, ctime_ns, copy};
    pthread_rwlock_unlock(&d->lock);
    return 0;
}

/* No more native opens of nodeid. After it returns, every open that saw the entry has been
 * counted in its slot (the count is raised under the read lock). Returns 1 if it was armed. */
int dh_disarm(struct dh *d, uint64_t nodeid) {
    pthread_rwlock_wrlock(&d->lock);
    struct entry *e = find(d, nodeid, NULL);
    int was = e != NULL;
    if (e) { free(e->path); memset(e, 0, sizeof *e); e->nodeid = DH_TOMB; d->used--; d->tombs++; }
    if (2 * (d->used + d->tombs) > d->cap) rehash(d, d->cap);
    pthread_rwlock_unlock(&d->lock);
    return was;
}

/* Copies up to max queued (nodeid, pid) opens to out (2 * max uint64s); returns how many. */
size_t dh_drain(struct dh *d, uint64_t *out, size_t max) {
    pthread_mutex_lock(&d->qlock);
    size_t n = d->qlen < max ? d->qlen : max;
    for (size_t i = 0; i < n; i++) {
        struct event *ev = &d->queue[(d->qhead + i) % d->qcap];
        out[2 * i] = ev->nodeid; out[2 * i + 1] = ev->pid;
    }
    d->qhead = (d->qhead + n) % d->qcap; d->qlen -= n;
    pthread_mutex_unlock(&d->qlock);
    return n;
}

uint64_t dh_stat(struct dh *d, int which) {
    if (which == 5 || which == 6) {  /* the arm table's tombstones (bounded by rehash), capacity */
        pthread_rwlock_rdlock(&d->lock);
        uint64_t t = which == 5 ? d->tombs : d->cap;
        pthread_rwlock_unlock(&d->lock);
        return t;
    }
    if (which == 7) return __atomic_load_n(&d->stats[5], __ATOMIC_RELAXED);
    if (which == 8) return __atomic_load_n(&d->stats[6], __ATOMIC_RELAXED);
    return which >= 0 && which < 5 ? __atomic_load_n(&d->stats[which], __ATOMIC_RELAXED) : 0;
}

/* Count one release of a native handle of slot (also used by Python when no native loop runs). */
void dh_released(struct dh *d, uint32_t slot) {
    if (slot < d->nslots) __atomic_fetch_sub(&d->counts[slot], 1, __ATOMIC_SEQ_CST);
}

static int reply(int fd, uint64_t unique, int32_t error, const void *arg, size_t arglen);

static uint64_t name_hash(uint64_t parent, const char *name, size_t len) {
    uint64_t h = 1469598103934665603ull ^ parent;  /* FNV-1a over the parent, then the name */
    for (size_t i = 0; i < len; i++) { h ^= (unsigned char)name[i]; h *= 1099511628211ull; }
    return h ? h : 1;
}

static struct lentry *find_name(struct dh *d, uint64_t parent, const char *name, size_t len,
                                uint64_t h) {
    for (size_t i = h & (d->ncap - 1), n = 0; n < d->ncap; i = (i + 1) & (d->ncap - 1), n++) {
        struct lentry *e = &d->names[i];
        if (!e->hash) return e;
        if (e->hash == h && e->parent == parent && e->namelen == len && !memcmp(e->blob, name, len))
            return e;
    }
    return NULL;
}

/* The epoch to pass to dh_remember for a LOOKUP about to be answered. */
uint64_t dh_names_epoch(struct dh *d) { return __atomic_load_n(&d->epoch, __ATOMIC_SEQ_CST); }

/* Forget every remembered answer (the names changed: a refresh). */
void dh_forget_names(struct dh *d) {
    pthread_rwlock_wrlock(&d->llock);
    __atomic_fetch_add(&d->epoch, 1, __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < d->ncap; i++) { free(d->names[i].blob); d->names[i] = (struct lentry){0}; }
    d->nused = 0;
    pthread_rwlock_unlock(&d->llock);
}

/* Remember Python's answer to LOOKUP(parent, name), given before epoch changed. A full table is
 * cleared first (the answers are immutable: clearing costs only Python lookups again).
 * Returns 1 if remembered. */
int dh_remember(struct dh *d, uint64_t epoch, uint64_t parent, const char *name, uint32_t namelen,
                const char *reply_arg, uint32_t replylen) {
    if (!d->nmax || replylen > ENTRY_OUT_MAX || namelen == 0) return 0;
    char *blob = malloc((size_t)namelen + replylen);
    if (!blob) return 0;
    memcpy(blob, name, namelen); memcpy(blob + namelen, reply_arg, replylen);
    uint64_t h = name_hash(parent, name, namelen);
    pthread_rwlock_wrlock(&d->llock);
    if (epoch != d->epoch) { pthread_rwlock_unlock(&d->llock); free(blob); return 0; }
    if (d->nused >= d->nmax) {
        for (size_t i = 0; i < d->ncap; i++) { free(d->names[i].blob); d->names[i] = (struct lentry){0}; }
        d->nused = 0;
    }
    struct lentry *e = find_name(d, parent, name, namelen, h);
    if (!e) { pthread_rwlock_unlock(&d->llock); free(blob); return 0; }
    if (e->hash) free(e->blob); else d->nused++;
    *e = (struct lentry){parent, h, blob, namelen, replylen};
    pthread_rwlock_unlock(&d->llock);
    return 1;
}

static int try_lookup(struct dh *d, const struct in_header *h, const char *arg, size_t arglen) {
    size_t len = strnlen(arg, arglen);
    if (len == 0 || len == arglen) return 0;  /* not NUL-terminated within the request */
    unsigned char out[ENTRY_OUT_MAX];
    uint32_t outlen = 0;
    uint64_t hv = name_hash(h->nodeid, arg, len);
    pthread_rwlock_rdlock(&d->llock);
    struct lentry *e = find_name(d, h->nodeid, arg, len, hv);
    if (e && e->hash) { outlen = e->replylen; memcpy(out, e->blob + e->namelen, outlen); }
    pthread_rwlock_unlock(&d->llock);
    if (!outlen) return 0;
    int r = reply(d->fd, h->unique, 0, out, outlen);
    if (r == -ENODEV) return r;
    if (r < 0 && r != -ENOENT) return 0;  /* not sent: Python answers (and says why) */
    __atomic_fetch_add(&d->stats[4], 1, __ATOMIC_RELAXED);
    return 1;
}

static int reply(int fd, uint64_t unique, int32_t error, const void *arg, size_t arglen) {
    struct out_header h = {(uint32_t)(sizeof h + arglen), error, unique};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)arg, arglen}};
    ssize_t n = writev(fd, iov, arglen ? 2 : 1);
    return n < 0 ? -errno : 0;
}

static int queue_open(struct dh *d, uint64_t nodeid, uint32_t pid) {
    int ok = 0;
    pthread_mutex_lock(&d->qlock);
    if (d->qlen < d->qcap) {
        d->queue[(d->qhead + d->qlen) % d->qcap] = (struct event){nodeid, pid};
        d->qlen++; ok = 1;
    }
    pthread_mutex_unlock(&d->qlock);
    return ok;
}

/* Is this the cache file Python verified when it armed the id? Same inode, size, and
 * modification and change times (ns): a file replaced, truncated or written since differs. */
static int same_file(const struct stat *st, uint64_t ino, uint64_t size, uint64_t mtime_ns, uint64_t ctime_ns) {
    return (uint64_t)st->st_ino == ino && (uint64_t)st->st_size == size
        && (uint64_t)st->st_mtim.tv_sec * 1000000000ull + st->st_mtim.tv_nsec == mtime_ns
        && (uint64_t)st->st_ctim.tv_sec * 1000000000ull + st->st_ctim.tv_nsec == ctime_ns;
}

/* 1: answered here; 0: for Python (also when the answer could not be written: a request is
 * never dropped unanswered); -ENODEV: the mount is gone. */
static int try_open(struct dh *d, const struct in_header *h, const char *arg, size_t arglen) {
    if (arglen < sizeof(struct open_in)) return 0;
    const struct open_in *in = (const void *)arg;
    if (in->flags & (O_ACCMODE | O_TRUNC | O_APPEND | O_CREAT)) return 0;  /* Python: EROFS */
    pthread_rwlock_rdlock(&d->lock);
    struct entry *e = find(d, h->nodeid, NULL);
    if (!e || e->backing_id < 0) { pthread_rwlock_unlock(&d->lock); return 0; }  /* < 0: reads only */
    struct stat st;
    if (stat(e->path, &st) != 0 || !same_file(&st, e->ino, e->size, e->mtime_ns, e->ctime_ns)) {
        pthread_rwlock_unlock(&d->lock);
        __atomic_fetch_add(&d->stats[3], 1, __ATOMIC_RELAXED);
        return 0;  /* Python disarms it and decides (fastopen.py) */
    }
    if (!queue_open(d, h->nodeid, h->pid)) { pthread_rwlock_unlock(&d->lock); return 0; }
    uint32_t slot = e->slot;
    int32_t bid = e->backing_id;
    __atomic_fetch_add(&d->counts[slot], 1, __ATOMIC_SEQ_CST);  /* before the reply, under the lock */
    pthread_rwlock_unlock(&d->lock);
    struct open_out out = {DH_NATIVE_FH | ((uint64_t)slot << DH_SLOT_SHIFT) | DH_PREPAID_PASSED,
                           FOPEN_PASSTHROUGH | FOPEN_NOFLUSH, bid};
    int r = reply(d->fd, h->unique, 0, &out, sizeof out);
    if (r == -ENOENT) {  /* interrupted: the kernel dropped the answer and sends no RELEASE */
        dh_released(d, slot);
        return 1;
    }
    if (r < 0) {  /* not sent: the count goes back down, and Python answers (and says why) */
        dh_released(d, slot);
        return r == -ENODEV ? r : 0;
    }
    __atomic_fetch_add(&d->stats[0], 1, __ATOMIC_RELAXED);
    return 1;
}

static int try_release(struct dh *d, const struct in_header *h, const char *arg, size_t arglen) {
    if (arglen < sizeof(struct release_in)) return 0;
    const struct release_in *in = (const void *)arg;
    if (!(in->fh & DH_NATIVE_FH)) return 0;
    int r = reply(d->fd, h->unique, 0, NULL, 0);
    dh_released(d, (uint32_t)((in->fh & ~DH_NATIVE_FH) >> DH_SLOT_SHIFT));  /* after the reply */
    __atomic_fetch_add(&d->stats[1], 1, __ATOMIC_RELAXED);
    return r == -ENODEV ? r : 1;
}

/* READ of a file the kernel opened itself (handle 0: kernel opens, fs.serve_opens_in_kernel)
 * whose node id is armed: the bytes from its cache file, opened here and checked with fstat to
 * be the file Python verified (the same identity as try_open's, on the descriptor read, so a
 * file replaced after the check cannot be read). Its hit was counted when fanotify reported the
 * open; a read of a whole verified file fetches nothing, so there is nothing more to count. */
static int try_read(struct dh *d, const struct in_header *h, const char *arg, size_t arglen) {
    static __thread char *buf;
    if (arglen < sizeof(struct read_in)) return 0;
    const struct read_in *in = (const void *)arg;
    if (in->fh != 0 || in->size > READ_MAX) return 0;
    char path[4096];
    uint64_t ino, size, mtime_ns, ctime_ns;
    pthread_rwlock_rdlock(&d->lock);
    struct entry *e = find(d, h->nodeid, NULL);
    if (!e || strlen(e->path) >= sizeof path) { pthread_rwlock_unlock(&d->lock); return 0; }
    strcpy(path, e->path);
    ino = e->ino; size = e->size; mtime_ns = e->mtime_ns; ctime_ns = e->ctime_ns;
    pthread_rwlock_unlock(&d->lock);
    if (!buf && !(buf = malloc(READ_MAX))) return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    ssize_t n = -1;
    if (fstat(fd, &st) == 0 && same_file(&st, ino, size, mtime_ns, ctime_ns)) {
        size_t want = in->offset >= size ? 0 : (size_t)(size - in->offset < in->size ? size - in->offset : in->size);
        size_t got = 0;
        while (got < want) {
            ssize_t r = pread(fd, buf + got, want - got, (off_t)(in->offset + got));
            if (r <= 0) break;
            got += (size_t)r;
        }
        n = got == want ? (ssize_t)got : -1;  /* short: the file changed under us; Python answers */
    } else {
        __atomic_fetch_add(&d->stats[3], 1, __ATOMIC_RELAXED);
    }
    close(fd);
    if (n < 0) return 0;
    int r = reply(d->fd, h->unique, 0, buf, (size_t)n);
    if (r == -ENODEV) return r;
    if (r < 0 && r != -ENOENT) return 0;
    __atomic_fetch_add(&d->stats[5], 1, __ATOMIC_RELAXED);
    return 1;
}

/* Wait for the next request Python must answer. Returns its length (in buf), 0 when wake_fd
 * is readable (stop), or -errno: reading /dev/fuse failed (ENODEV: unmounted). epfd holds the
 * FUSE descriptor (EPOLLEXCLUSIVE) and wake_fd, as the Python loop sets it up. */
ssize_t dh_next(struct dh *d, int epfd, int wake_fd, char *buf, size_t len) {
    for (;;) {
        struct epoll_event ev[2];
        int n = epoll_wait(epfd, ev, 2, -1);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        for (int i = 0; i < n; i++) if (ev[i].data.fd == wake_fd) return 0;
        for (;;) {
            ssize_t got = read(d->fd, buf, len);
            if (got < 0) {
                if (errno == EAGAIN) break;
                if (errno == EINTR || errno == ENOENT) continue;
                return -errno;
            }
            if ((size_t)got < sizeof(struct in_header)) return got;
            const struct in_header *h = (const void *)buf;
            const char *arg = buf + sizeof *h;
            size_t arglen = (size_t)got - sizeof *h;
            int done = 0;
            if (h->opcode == OP_LOOKUP) done = try_lookup(d, h, arg, arglen);
            else if (h->opcode == OP_OPEN) done = try_open(d, h, arg, arglen);
            else if (h->opcode == OP_RELEASE) done = try_release(d, h, arg, arglen);
            else if (h->opcode == OP_READ) done = try_read(d, h, arg, arglen);
            if (done == -ENODEV) return -ENODEV;
            if (done == 0) return got;
            /* answered here: read on while requests wait, then back to epoll */
        }
    }
}

/* fanotify's records (FAN_REPORT_FID): struct fanotify_event_metadata, then one
 * struct fanotify_event_info_fid and its file handle. FUSE's handle (fuse_encode_fh) is the node
 * id's high and low 32 bits, then the generation: type 0x81, or 0x82 with the parent's after. */
struct fan_meta { uint32_t event_len; uint8_t vers, reserved; uint16_t metadata_len; uint64_t mask;
                  int32_t fd, pid; };
struct fan_fid { uint8_t info_type, pad; uint16_t len; int32_t fsid[2]; uint32_t handle_bytes;
                 int32_t handle_type; };
#define FAN_Q_OVERFLOW 0x4000
#define FAN_BATCH (64 * 1024)
#define FAN_MIN_EVENT (sizeof(struct fan_meta) + sizeof(struct fan_fid) + 8)
#define FAN_PIDS 64

/* What one event's handle counts: its key (0: not a handle this counter knows, skipped) and,
 * where found, the size that open counts. */
typedef uint64_t (*size_of_fn)(void *ctx, const struct fan_fid *f, const unsigned char *handle,
                               uint64_t *key, int *found);

/* The loop both counters share: read the events queued on fan_fd (non-blocking,
 * FAN_REPORT_FID, inode marks) and sum, per opening pid, the sizes size_of finds. Writes rows
 * of three uint64s to out: (pid, 0, bytes) for those sums, and (pid, key, 0) for an open whose
 * key size_of did not find (Python looks it up). info[0] += events with a known kind of handle,
 * info[1] += queue overflows, info[2] = 1 when it stopped for room in out (call again) rather
 * than on an empty queue, info[3] = errno when a read failed (0 otherwise). *known = opens
 * sized here. Returns the rows written, or -ENOMEM. lock, if not NULL, is read-held while a
 * batch is parsed. */
static ssize_t count_events(int fan_fd, size_of_fn size_of, void *ctx, pthread_rwlock_t *lock,
                            uint64_t *out, size_t rows, uint64_t *info, size_t *known_out) {
    static __thread char *buf;
    uint64_t pids[FAN_PIDS], bytes[FAN_PIDS];
    size_t npids = 0, used = 0, counted = 0, known = 0;
    info[2] = info[3] = 0;
    if (!buf && !(buf = malloc(FAN_BATCH))) return -ENOMEM;
    for (;;) {
        /* Room for every event of one more batch as an unknown id, and for the sums after. */
        if (rows - used < FAN_BATCH / FAN_MIN_EVENT + FAN_PIDS) { info[2] = 1; break; }
        ssize_t got = read(fan_fd, buf, FAN_BATCH);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) info[3] = (uint64_t)errno;
            break;
        }
        if (got == 0) break;
        if (lock) pthread_rwlock_rdlock(lock);
        for (size_t pos = 0; pos + sizeof(struct fan_meta) <= (size_t)got;) {
            const struct fan_meta *m = (const void *)(buf + pos);
            if (m->event_len < sizeof *m || pos + m->event_len > (size_t)got) break;
            if (m->mask & FAN_Q_OVERFLOW) info[1]++;
            size_t at = pos + m->metadata_len;
            pos += m->event_len;
            if (at + sizeof(struct fan_fid) + 8 > pos) continue;
            const struct fan_fid *f = (const void *)(buf + at);
            if (at + sizeof *f + f->handle_bytes > pos) continue;
            uint64_t key = 0, pid = (uint32_t)m->pid;
            int found = 0;
            uint64_t size = size_of(ctx, f, (const unsigned char *)(buf + at + sizeof *f), &key, &found);
            if (!key) continue;
            counted++;
            if (!found) {
                out[3 * used] = pid; out[3 * used + 1] = key; out[3 * used + 2] = 0; used++;
                continue;
            }
            known++;
            size_t i = 0;
            while (i < npids && pids[i] != pid) i++;
            if (i == FAN_PIDS) {  /* more openers than sums: this one gets a row of its own */
                out[3 * used] = pid; out[3 * used + 1] = 0; out[3 * used + 2] = size; used++;
                continue;
            }
            if (i == npids) { pids[i] = pid; bytes[i] = 0; npids++; }
            bytes[i] += size;
        }
        if (lock) pthread_rwlock_unlock(lock);
    }
    for (size_t i = 0; i < npids; i++) {
        out[3 * used] = pids[i]; out[3 * used + 1] = 0; out[3 * used + 2] = bytes[i]; used++;
    }
    info[0] += counted;
    *known_out = known;
    return (ssize_t)used;
}

/* FUSE's handle: the node id; sized by its arm entry, if armed. */
static uint64_t armed_size(void *ctx, const struct fan_fid *f, const unsigned char *handle,
                           uint64_t *key, int *found) {
    struct dh *d = ctx;
    if ((f->handle_type != 0x81 && f->handle_type != 0x82) || f->handle_bytes < 8) return 0;
    uint32_t half[2];
    memcpy(half, handle, sizeof half);
    *key = ((uint64_t)half[0] << 32) | half[1];
    struct entry *e = *key && *key != DH_TOMB ? find(d, *key, NULL) : NULL;
    if (!e) return 0;
    *found = 1;
    return e->size;
}

/* Count the opens queued on fan_fd (inode marks on the view's directories): for each event
 * naming an armed node id, the size its entry holds goes to the opening pid's sum; an open of a
 * node id not armed is a row (pid, nodeid, 0), whose size Python finds in the index. The rest
 * as count_events says. */
ssize_t dh_count_fanotify(struct dh *d, int fan_fd, uint64_t *out, size_t rows, uint64_t *info) {
    size_t known = 0;
    ssize_t used = count_events(fan_fd, armed_size, d, &d->lock, out, rows, info, &known);
    if (used >= 0) __atomic_fetch_add(&d->stats[6], known, __ATOMIC_RELAXED);
    return used;
}

/* The key of a file handle for a table of them (direct_opens.py computes the same one for the
 * files it links): FNV-1a over the handle type (4 bytes, little-endian) and the handle's bytes,
 * never 0. A handle is whatever the filesystem encodes (ext4: inode and generation; tmpfs:
 * generation and inode), so one hash serves every filesystem the cache can be on. */
uint64_t dh_handle_key(int32_t handle_type, const unsigned char *handle, uint32_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    uint32_t t = (uint32_t)handle_type;
    for (int i = 0; i < 4; i++) { h ^= (t >> (8 * i)) & 0xff; h *= 0x100000001b3ull; }
    for (uint32_t i = 0; i < len; i++) { h ^= handle[i]; h *= 0x100000001b3ull; }
    return h ? h : 1;
}

struct handle_table { const uint64_t *keys, *sizes; size_t n; };

/* Any filesystem's handle: its key, sized by a binary search of the sorted table. */
static uint64_t table_size(void *ctx, const struct fan_fid *f, const unsigned char *handle,
                           uint64_t *key, int *found) {
    const struct handle_table *t = ctx;
    if (f->handle_bytes > 128) return 0;  /* MAX_HANDLE_SZ */
    *key = dh_handle_key(f->handle_type, handle, f->handle_bytes);
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (t->keys[mid] < *key) lo = mid + 1; else hi = mid;
    }
    if (lo == t->n || t->keys[lo] != *key) return 0;
    *found = 1;
    return t->sizes[lo];
}

/* dh_count_fanotify for files on a local filesystem (a direct tree's hard links): sizes come
 * from keys (sorted, dh_handle_key of each file's handle) and sizes, n of each; an open whose
 * key is not there is a row (pid, key, 0). Needs no connection state. */
ssize_t dh_count_fanotify_table(int fan_fd, const uint64_t *keys, const uint64_t *sizes, size_t n,
                                uint64_t *out, size_t rows, uint64_t *info) {
    struct handle_table t = { keys, sizes, n };
    size_t known = 0;
    return count_events(fan_fd, table_size, &t, NULL, out, rows, info, &known);
}
