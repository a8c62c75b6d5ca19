/*
 * A copy-before-write filter for nbdkit, in C: the reference the copy-before-write benchmark races
 * blocksnap against to find what a C server reaches on this machine (bench/nbd/cow-bench.ts). It does what
 * blocksnap's DiffArea does with a break-snapshot policy and a file storage, and nothing more: before a
 * write, zero or trim first touches a chunk, the chunk is read from the plugin below and written to the
 * same offset of the target file; a chunk is copied once. nbdkit's request threads do the copies, each
 * blocking in pread and pwrite, so copies of independent chunks run in parallel, as in QEMU's filter.
 *
 * Locking: one mutex guards the chunk states (absent, copying, stored); a write to a chunk being copied
 * waits on a condition variable until the copy is stored. The data moves outside the mutex.
 * Not done: the image side (reading the snapshot), persistence, failure policies other than failing the
 * write. Build: sh bench/nbd/build-c-cbw-filter.sh (needs Debian's nbdkit-plugin-dev).
 * Usage: nbdkit --filter=./c-cbw-filter.so file FILE target=TARGET [chunk=65536]
 */
#define NBDKIT_API_VERSION 2
#include <errno.h>
#include <fcntl.h>
#include <nbdkit-filter.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { ABSENT = 0, COPYING = 1, STORED = 2 };
enum { chunk_bytes_max = 4 << 20 };

static const char *target_path;
static uint32_t chunk_bytes = 64 * 1024;
static int target_fd = -1;
static uint8_t *states;
static uint64_t chunk_count;
static uint64_t origin_bytes;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stored = PTHREAD_COND_INITIALIZER;

static int cbw_config(nbdkit_next_config *next, nbdkit_backend *nxdata, const char *key, const char *value) {
  if (strcmp(key, "target") == 0) {
    target_path = value;
    return 0;
  }
  if (strcmp(key, "chunk") == 0) {
    long parsed = strtol(value, NULL, 10);
    if (parsed < 4096 || parsed > chunk_bytes_max || (parsed & (parsed - 1)) != 0) {
      nbdkit_error("chunk must be a power of two from 4096 to %d", chunk_bytes_max);
      return -1;
    }
    chunk_bytes = (uint32_t)parsed;
    return 0;
  }
  return next(nxdata, key, value);
}

static int cbw_config_complete(nbdkit_next_config_complete *next, nbdkit_backend *nxdata) {
  if (target_path == NULL) {
    nbdkit_error("target=FILE is required");
    return -1;
  }
  target_fd = open(target_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (target_fd < 0) {
    nbdkit_error("open %s: %m", target_path);
    return -1;
  }
  return next(nxdata);
}

static int cbw_thread_model(void) { return NBDKIT_THREAD_MODEL_PARALLEL; }

/* The first connection sizes the chunk states and the target from the origin. */
static int cbw_prepare(nbdkit_next *next, void *handle, int readonly) {
  (void)handle;
  (void)readonly;
  int64_t size = next->get_size(next);
  if (size < 0) return -1;
  pthread_mutex_lock(&lock);
  int result = 0;
  if (states == NULL) {
    origin_bytes = (uint64_t)size;
    chunk_count = (origin_bytes + chunk_bytes - 1) / chunk_bytes;
    states = calloc(chunk_count ? chunk_count : 1, 1);
    if (states == NULL || ftruncate(target_fd, (off_t)origin_bytes) != 0) {
      nbdkit_error("cannot size the chunk map or the target: %m");
      result = -1;
    }
  } else if ((uint64_t)size != origin_bytes) {
    nbdkit_error("the origin changed size");
    result = -1;
  }
  pthread_mutex_unlock(&lock);
  return result;
}

/* Copies one chunk to the target unless it is stored; waits for a copy another thread is making. */
static int preserve_chunk(nbdkit_next *next, uint64_t chunk, int *err) {
  pthread_mutex_lock(&lock);
  while (states[chunk] == COPYING) pthread_cond_wait(&stored, &lock);
  if (states[chunk] == STORED) {
    pthread_mutex_unlock(&lock);
    return 0;
  }
  states[chunk] = COPYING;
  pthread_mutex_unlock(&lock);

  static __thread uint8_t *buffer;
  if (buffer == NULL && (buffer = malloc(chunk_bytes_max)) == NULL) {
    *err = ENOMEM;
    pthread_mutex_lock(&lock);
    states[chunk] = ABSENT;
    pthread_cond_broadcast(&stored);
    pthread_mutex_unlock(&lock);
    return -1;
  }
  uint64_t start = chunk * chunk_bytes;
  uint32_t length = (uint32_t)(origin_bytes - start < chunk_bytes ? origin_bytes - start : chunk_bytes);
  int result = next->pread(next, buffer, length, start, 0, err);
  for (uint32_t done = 0; result == 0 && done < length;) {
    ssize_t written = pwrite(target_fd, buffer + done, length - done, (off_t)(start + done));
    if (written <= 0) {
      *err = written < 0 ? errno : EIO;
      result = -1;
    } else {
      done += (uint32_t)written;
    }
  }
  pthread_mutex_lock(&lock);
  states[chunk] = result == 0 ? STORED : ABSENT;
  pthread_cond_broadcast(&stored);
  pthread_mutex_unlock(&lock);
  return result;
}

static int preserve_range(nbdkit_next *next, uint32_t count, uint64_t offset, int *err) {
  if (count == 0) return 0;
  uint64_t last = (offset + count - 1) / chunk_bytes;
  for (uint64_t chunk = offset / chunk_bytes; chunk <= last && chunk < chunk_count; chunk++) {
    if (preserve_chunk(next, chunk, err) != 0) return -1;
  }
  return 0;
}

static int cbw_pwrite(nbdkit_next *next, void *handle, const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags, int *err) {
  (void)handle;
  if (preserve_range(next, count, offset, err) != 0) return -1;
  return next->pwrite(next, buf, count, offset, flags, err);
}

static int cbw_zero(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                    int *err) {
  (void)handle;
  if (preserve_range(next, count, offset, err) != 0) return -1;
  return next->zero(next, count, offset, flags, err);
}

static int cbw_trim(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                    int *err) {
  (void)handle;
  if (preserve_range(next, count, offset, err) != 0) return -1;
  return next->trim(next, count, offset, flags, err);
}

static struct nbdkit_filter filter = {
    .name = "cbw",
    .longname = "blocksnap benchmark copy-before-write filter",
    .config = cbw_config,
    .config_complete = cbw_config_complete,
    .config_help = "target=FILE  where copied chunks go (created, truncated)\nchunk=BYTES  chunk size",
    .thread_model = cbw_thread_model,
    .prepare = cbw_prepare,
    .pwrite = cbw_pwrite,
    .zero = cbw_zero,
    .trim = cbw_trim,
};

NBDKIT_REGISTER_FILTER(filter)
