/**
 * The shared memory between a FileSystemWriter (fs-writer.ts) and its thread (fs-writer-worker.ts). No
 * message is posted per batch: the writer fills a slot (an operation table and a staging buffer with the
 * payloads), bumps SUBMITTED and wakes the thread with Atomics.notify; the thread runs the slot's
 * operations in order. Batch n always uses slot n % slotCount, and at most slotCount batches are out, so
 * a slot is never reused while the thread reads it.
 *
 * Completions stream back one operation at a time: after each operation the thread stores its outcome
 * (0 or a negative errno) in the slot's result table and bumps DONE_OPS (operations done over all
 * batches, wrapping at 2^32), so the event loop can answer the first writes of a batch while the thread
 * still runs the rest. Wake-ups stay bounded: the thread calls Atomics.notify on DONE_OPS after every
 * notifyEveryOps operations and after the last of a batch, and a notify wakes the event loop only while
 * it waits (Atomics.waitAsync on DONE_OPS, from the count it has settled), which it does only once it has
 * handled the previous wake-up; completions that come while the loop is busy find no waiter and are
 * collected at its next wake-up, one wake-up for all of them (a notify that finds no waiter costs a lock
 * and a lookup in V8). No completion is ever left waiting: operations done before the loop's wait make the
 * waitAsync return at once (DONE_OPS is no longer what it settled), and every operation done after it is
 * followed by a notify (the last of each batch is a notify point).
 * An earlier version notified only when the thread took a flag that the loop set before each wait. A
 * thread preempted between bumping DONE_OPS and taking the flag could take a flag set for a later wait,
 * after the loop had already settled that operation, and notify before the wait began; the flag was gone,
 * so no later operation notified and every write on that file system hung (2 of 6 runs of 3 s of copy-
 * before-write in process on a freshly booted machine; fs-writer.test.ts widens the window with
 * pauseBeforeNotifyMicros).
 *
 * A staging buffer that must grow (a write larger than batchBytesMax) is replaced by
 * posting the new one on the slot's port before the batch is submitted; the thread takes such messages
 * with receiveMessageOnPort before it runs a batch, so it always sees the buffer the batch was staged in.
 *
 * Writes by reference: a payload that already lives in a SharedArrayBuffer (the NBD face receives WRITE
 * payloads into such buffers) is not staged. The writer registers the buffer once with the thread (a
 * SharedRegistered message, posted before the first batch that uses it) and the operation names it by id
 * (field 5; -1: the slot's staging buffer) and offset. The writer's caller keeps the payload unchanged
 * until the write settles (the BlockDevice contract), and a registration is dropped (SharedReleased) only
 * once the writer's side of the buffer was garbage-collected, so no batch can still name it.
 */

export const opFields = 6;
/** Field 5 of an operation: the payload is in the slot's staging buffer. */
export const BUFFER_STAGING = -1;
export const OP_WRITE = 0;
export const OP_EXTEND = 1;
/** Writes zeroes from the thread's own buffer: length in the length field, no payload. */
export const OP_ZERO = 2;

/**
 * Batches out at once, and the slots they occupy. Four, so that writes arriving while the thread is busy
 * go out at once in batches of their own instead of piling up into one large batch behind a full slot
 * set (which made the writes of a queue move in one clump: the thread idle while the event loop and the
 * client turned the clump around, and the other way round).
 */
export const slotCount = 4;
/**
 * Within a batch, the thread notifies after every notifyEveryOps operations (and after the last); the
 * notify wakes the event loop only when it waits again, i.e. has handled the previous wake-up, so a busy
 * loop is not woken more often than it can turn completions around. At queue depth 32
 * a batch of 32 writes moved as one clump: the thread wrote all of them while the loop and the client
 * waited, then idled while they replied and sent the next 32 (each thread ~50 % busy, a third of the
 * machine idle). With 4, fio 4 KiB randwrite QD32 over NBD on the quiet machine: 31.4k instead of 25.0k
 * IOPS and 39 instead of 43 µs of server CPU per write (medians of 4 alternated runs); 256 KiB writes
 * unchanged. An earlier measurement on the loaded machine (load 5–7) found 8 costing the event loop
 * ~10 µs more CPU per write than 32: under load the extra wake-ups are not free.
 */
export const notifyEveryOps = 4;
/** Operations per batch at most (the table of a slot is sized for it). */
export const opsPerBatchMax = 1024;

/** Indexes into the doorbell (an Int32Array over a SharedArrayBuffer). */
export const DOORBELL_SUBMITTED = 0;
/** Operations done, over all batches (wraps; compare with `| 0` differences). */
export const DOORBELL_DONE_OPS = 1;
/** Per slot: the operation count of the batch in it. */
export const doorbellSlotBase = 2;
export const doorbellInts = doorbellSlotBase + slotCount;

/** What the thread gets at start (workerData). */
export interface WriterShared {
  readonly doorbell: SharedArrayBuffer;
  /** Per slot: opsPerBatchMax × opFields numbers (kind, fd, position, payload offset, length, buffer id). */
  readonly opTables: readonly SharedArrayBuffer[];
  /** Per slot: opsPerBatchMax outcomes, 0 or a negative errno (Node's `error.errno`). */
  readonly resultTables: readonly SharedArrayBuffer[];
  readonly stagingBuffers: readonly SharedArrayBuffer[];
  /**
   * Tests only: the thread spins this long after publishing each notify point's count and before it
   * notifies, which widens the window in which a wake-up could be lost (fs-writer.test.ts).
   */
  readonly pauseBeforeNotifyMicros: number;
}

/** Posted (on the thread's port) when a slot's staging buffer is replaced. */
export interface StagingReplaced {
  readonly type: "staging";
  readonly slot: number;
  readonly staging: SharedArrayBuffer;
}

/** Posted before the first batch that writes from `buffer` by reference. */
export interface SharedRegistered {
  readonly type: "register";
  readonly id: number;
  readonly buffer: SharedArrayBuffer;
}

/** Posted once no batch can name the buffer any more. */
export interface SharedReleased {
  readonly type: "release";
  readonly id: number;
}

export type WriterMessage = StagingReplaced | SharedRegistered | SharedReleased;
