/**
 * FileSystemWriter: the writes and extensions of every file on one file system (or one block device) run
 * on one thread of their own, off the event loop. A write to a file system under `fsfreeze -f`, or to a
 * dying disk, blocks in the kernel until it recovers; on the event loop that stalled every device and the
 * control API, and in the libuv pool (4 threads, shared with everything) a few such writes stalled every
 * other file. One thread per file system confines a stall to the files that are stalled anyway, and lets
 * the event loop and the writes use both cores.
 *
 * Batching: operations issued in one turn of the event loop go to the thread as one batch (payloads
 * copied into the slot's reused shared staging buffer, at most batchBytesMax staged bytes and
 * opsPerBatchMax operations per batch; a payload already in a SharedArrayBuffer is written by reference
 * instead, see fs-write-protocol.ts),
 * so a queue of 4 KiB writes costs one wake-up per batch instead of one per write. With slotCount batches
 * out, the next one waits for a completion and collects what arrives meanwhile. Operations run in issue
 * order. The thread publishes each outcome as soon as the write is done, and the event loop settles every
 * write it finds done when it wakes: the thread wakes it at the end of a batch, and within a large batch
 * every notifyEveryOps writes, so that a large batch does not move as one clump (the thread busy with all
 * of it while the event loop and the client wait, then idle while they turn it around). Completions that
 * arrive while the event loop is busy are collected in one wake-up (see fs-write-protocol.ts).
 *
 * Transport (fs-write-protocol.ts): shared memory and Atomics, no message per batch. The thread sleeps in
 * Atomics.wait and is woken by Atomics.notify; the event loop waits for completions with Atomics.waitAsync.
 * A postMessage round trip (structured clone, a MessagePort event on both sides) cost 1.5–3× this here,
 * and every 4 KiB write at queue depth 1 pays one round trip.
 *
 * Lifetime: a writer is shared by reference count (acquire/release by the file backends); its thread
 * starts on first use, is referenced only while batches are out (an idle writer never keeps the process
 * alive), and ends when the last file releases it. A thread that dies fails its batches with EIO; the
 * operations not yet submitted go to a new thread.
 *
 * Shared payloads: the NBD face receives large WRITE payloads into SharedArrayBuffer-backed buffers, and
 * the thread writes them where they are, which saves the event loop a copy of every such payload (a
 * 256 KiB write over NBD was copied twice: out of the socket's chunks, then into the staging buffer).
 * A buffer is registered with the thread on first use and released when this side's buffer object is
 * collected (FinalizationRegistry); at most sharedBytesMax are registered at once (beyond that payloads
 * are staged), so a caller that churns through shared buffers cannot pin unbounded memory in the thread.
 */
import { getSystemErrorMap } from "node:util";
import { Worker } from "node:worker_threads";
import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { copyBytes } from "../util/shared-copy.js";
import {
  BUFFER_STAGING,
  DOORBELL_DONE_OPS,
  DOORBELL_SUBMITTED,
  doorbellInts,
  doorbellSlotBase,
  OP_EXTEND,
  OP_WRITE,
  OP_ZERO,
  opFields,
  opsPerBatchMax,
  type SharedRegistered,
  type SharedReleased,
  type StagingReplaced,
  slotCount,
  type WriterShared,
} from "./fs-write-protocol.js";

/** Payload bytes per batch: larger writes go alone in a batch of their own. */
export const batchBytesMax = 4 << 20;
/** A slot's staging buffer at first (it grows by doubling up to batchBytesMax). */
const stagingBytesMin = 64 << 10;
/** Bytes of shared buffers registered with one thread at most. */
export const sharedBytesMax = 256 << 20;

export interface WriterTestOptions {
  /** See WriterShared.pauseBeforeNotifyMicros. */
  readonly pauseBeforeNotifyMicros?: number;
}

interface PendingOp {
  readonly kind: number;
  readonly fd: number;
  readonly positionBytes: number;
  readonly source: Uint8Array | null;
  /** Length of an OP_ZERO (it has no payload). */
  readonly zeroLengthBytes: number;
  readonly resolve: () => void;
  readonly reject: (error: Error) => void;
}

interface Batch {
  readonly ops: PendingOp[];
  /** Payload bytes to stage (payloads in shared memory are not counted: they may go by reference). */
  payloadBytes: number;
}

/** The thread and the memory it shares with this side; a new thread gets new memory. */
interface Thread {
  readonly worker: Worker;
  readonly doorbell: Int32Array;
  readonly opTables: readonly Float64Array[];
  readonly resultTables: readonly Int32Array[];
  readonly stagings: SharedArrayBuffer[];
  submitted: number;
  /** Batches whose every operation is settled (the oldest batch out is batch `completed`). */
  completed: number;
  /** The batches submitted and not completed, oldest first (batch n is in slot n % slotCount). */
  readonly inflight: PendingOp[][];
  /** Operations of the oldest batch out already settled. */
  settledInBatch: number;
  /** Operations settled over all batches, as DONE_OPS counts them (wrapping int32). */
  settledOps: number;
  waiting: boolean;
  /** Shared buffers registered with this thread, by id; and the bytes they hold. */
  readonly sharedIds: WeakMap<SharedArrayBuffer, number>;
  nextSharedId: number;
  sharedBytes: number;
  /** Releases a registration once this side's buffer is collected. */
  readonly sharedRegistry: FinalizationRegistry<{ readonly id: number; readonly lengthBytes: number }>;
}

export class FileSystemWriter {
  private static readonly writers = new Map<string, FileSystemWriter>();

  /**
   * The writer of the file system (or block device) named by `key`; release() when done with it.
   * `testOptions` (tests only) apply when this call creates the writer.
   */
  static acquire(key: string, testOptions: WriterTestOptions = {}): FileSystemWriter {
    let writer = FileSystemWriter.writers.get(key);
    if (!writer) {
      writer = new FileSystemWriter(key, testOptions.pauseBeforeNotifyMicros ?? 0);
      FileSystemWriter.writers.set(key, writer);
    }
    writer.references++;
    return writer;
  }

  /** Writers alive now (tests). */
  static get count(): number {
    return FileSystemWriter.writers.size;
  }

  readonly key: string;
  private references = 0;
  private thread: Thread | null = null;
  /** Batches not submitted yet; the last one is open for more operations. */
  private readonly pending: Batch[] = [];
  private sendScheduled = false;

  private readonly pauseBeforeNotifyMicros: number;

  private constructor(key: string, pauseBeforeNotifyMicros: number) {
    this.key = key;
    this.pauseBeforeNotifyMicros = pauseBeforeNotifyMicros;
  }

  release(): void {
    assert(this.references > 0, "a file system writer was released more than acquired");
    this.references--;
    if (this.references > 0) return;
    FileSystemWriter.writers.delete(this.key);
    this.stopWhenIdle();
  }

  /** Writes all of `source` at `positionBytes` of `fd`. */
  write(fd: number, positionBytes: number, source: Uint8Array): Promise<void> {
    return this.enqueue(OP_WRITE, fd, positionBytes, source);
  }

  /** Writes `lengthBytes` of zeroes at `positionBytes` (from the thread's own zero buffer, no payload). */
  writeZeroes(fd: number, positionBytes: number, lengthBytes: number): Promise<void> {
    return this.enqueue(OP_ZERO, fd, positionBytes, null, lengthBytes);
  }

  /** Extends (ftruncate) `fd` to `sizeBytes`, in order with the writes before it. */
  extend(fd: number, sizeBytes: number): Promise<void> {
    return this.enqueue(OP_EXTEND, fd, sizeBytes, null);
  }

  private enqueue(
    kind: number,
    fd: number,
    positionBytes: number,
    source: Uint8Array | null,
    zeroLengthBytes = 0,
  ): Promise<void> {
    assert(this.references > 0, "a released file system writer got work");
    const lengthBytes = source && !(source.buffer instanceof SharedArrayBuffer) ? source.byteLength : 0;
    let open = this.pending.at(-1);
    if (
      !open ||
      open.ops.length >= opsPerBatchMax ||
      (open.ops.length > 0 && open.payloadBytes + lengthBytes > batchBytesMax)
    ) {
      if (open) this.sendWhileSlotsFree();
      open = { ops: [], payloadBytes: 0 };
      this.pending.push(open);
    }
    const batch = open;
    return new Promise<void>((resolve, reject) => {
      batch.ops.push({ kind, fd, positionBytes, source, zeroLengthBytes, resolve, reject });
      batch.payloadBytes += lengthBytes;
      if (!this.sendScheduled) {
        this.sendScheduled = true;
        setImmediate(() => {
          this.sendScheduled = false;
          // With every slot busy, the open batch waits for a completion and grows meanwhile.
          this.sendWhileSlotsFree();
        });
      }
    });
  }

  private sendWhileSlotsFree(): void {
    for (;;) {
      const batch = this.pending[0];
      if (!batch || batch.ops.length === 0) return;
      if (this.thread && this.thread.inflight.length >= slotCount) return;
      this.pending.shift();
      this.submit(batch);
    }
  }

  private submit(batch: Batch): void {
    const thread = this.thread ?? this.startThread();
    const slot = thread.submitted % slotCount;
    const table = thread.opTables[slot];
    assert(table, "a slot's operation table exists");
    const sharedIds = batch.ops.map((op) => this.sharedIdOf(thread, op.source));
    let stagedBytes = 0;
    batch.ops.forEach((op, index) => {
      if (op.source && sharedIds[index] === BUFFER_STAGING) stagedBytes += op.source.byteLength;
    });
    const data = new Uint8Array(this.stagingFor(thread, slot, stagedBytes), 0, stagedBytes);
    let dataOffsetBytes = 0;
    batch.ops.forEach((op, index) => {
      const base = index * opFields;
      const sharedId = sharedIds[index] ?? BUFFER_STAGING;
      table[base] = op.kind;
      table[base + 1] = op.fd;
      table[base + 2] = op.positionBytes;
      table[base + 4] = op.source ? op.source.byteLength : op.zeroLengthBytes;
      table[base + 5] = sharedId;
      if (!op.source) return;
      if (sharedId !== BUFFER_STAGING) {
        table[base + 3] = op.source.byteOffset;
        return;
      }
      table[base + 3] = dataOffsetBytes;
      copyBytes(data, dataOffsetBytes, op.source);
      dataOffsetBytes += op.source.byteLength;
    });
    if (thread.inflight.length === 0) thread.worker.ref();
    thread.inflight.push(batch.ops);
    thread.doorbell[doorbellSlotBase + slot] = batch.ops.length;
    thread.submitted++;
    Atomics.store(thread.doorbell, DOORBELL_SUBMITTED, thread.submitted);
    Atomics.notify(thread.doorbell, DOORBELL_SUBMITTED);
    this.awaitCompletion(thread);
  }

  /**
   * The thread's id of the shared buffer `source` lives in, registering it on first use; BUFFER_STAGING
   * when the payload is to be staged (not shared, or the registrations are at their bound).
   */
  private sharedIdOf(thread: Thread, source: Uint8Array | null): number {
    if (!source || !(source.buffer instanceof SharedArrayBuffer)) return BUFFER_STAGING;
    const buffer = source.buffer;
    const known = thread.sharedIds.get(buffer);
    if (known !== undefined) return known;
    if (thread.sharedBytes + buffer.byteLength > sharedBytesMax) return BUFFER_STAGING;
    const id = thread.nextSharedId++;
    thread.sharedIds.set(buffer, id);
    thread.sharedBytes += buffer.byteLength;
    thread.sharedRegistry.register(buffer, { id, lengthBytes: buffer.byteLength });
    const message: SharedRegistered = { type: "register", id, buffer };
    thread.worker.postMessage(message);
    return id;
  }

  /**
   * The slot's staging buffer, replaced when the batch needs more or when one grown past batchBytesMax
   * (one large write) is no longer needed: reused otherwise, because a fresh one per batch cost more in
   * page faults than the writes themselves (4 MiB: ~5 ms of faults and zeroing against ~1 ms of copying).
   * It starts at stagingBytesMin and doubles up to batchBytesMax as batches need it: a thread that only
   * ever stages 4 KiB writes does not fault in slotCount × 4 MiB (on this VM a page fault costs tens of
   * microseconds, and the whole set was ~8 % of the event loop's time in a short write benchmark).
   */
  private stagingFor(thread: Thread, slot: number, lengthBytes: number): SharedArrayBuffer {
    const current = thread.stagings[slot];
    assert(current, "a slot's staging buffer exists");
    const fits = current.byteLength >= lengthBytes;
    if (fits && (current.byteLength <= batchBytesMax || lengthBytes > batchBytesMax)) return current;
    let sizeBytes = lengthBytes;
    if (lengthBytes <= batchBytesMax) {
      sizeBytes = Math.min(current.byteLength, batchBytesMax);
      while (sizeBytes < lengthBytes) sizeBytes *= 2;
      sizeBytes = Math.min(sizeBytes, batchBytesMax);
    }
    const staging = new SharedArrayBuffer(sizeBytes);
    thread.stagings[slot] = staging;
    const message: StagingReplaced = { type: "staging", slot, staging };
    thread.worker.postMessage(message);
    return staging;
  }

  private startThread(): Thread {
    const doorbell = new SharedArrayBuffer(doorbellInts * Int32Array.BYTES_PER_ELEMENT);
    const opTables = Array.from(
      { length: slotCount },
      () => new SharedArrayBuffer(opsPerBatchMax * opFields * Float64Array.BYTES_PER_ELEMENT),
    );
    const resultTables = Array.from(
      { length: slotCount },
      () => new SharedArrayBuffer(opsPerBatchMax * Int32Array.BYTES_PER_ELEMENT),
    );
    const stagings = Array.from({ length: slotCount }, () => new SharedArrayBuffer(stagingBytesMin));
    const shared: WriterShared = {
      doorbell,
      opTables,
      resultTables,
      stagingBuffers: stagings,
      pauseBeforeNotifyMicros: this.pauseBeforeNotifyMicros,
    };
    const worker = new Worker(new URL("./fs-writer-worker.js", import.meta.url), { workerData: shared });
    worker.unref();
    const thread: Thread = {
      worker,
      doorbell: new Int32Array(doorbell),
      opTables: opTables.map((buffer) => new Float64Array(buffer)),
      resultTables: resultTables.map((buffer) => new Int32Array(buffer)),
      stagings,
      submitted: 0,
      completed: 0,
      inflight: [],
      settledInBatch: 0,
      settledOps: 0,
      waiting: false,
      sharedIds: new WeakMap(),
      nextSharedId: 0,
      sharedBytes: 0,
      sharedRegistry: new FinalizationRegistry(({ id, lengthBytes }) => {
        thread.sharedBytes -= lengthBytes;
        // The buffer is gone on this side, so no batch can name it: the thread may drop it too.
        if (this.thread !== thread) return;
        const message: SharedReleased = { type: "release", id };
        thread.worker.postMessage(message);
      }),
    };
    worker.on("error", (error) => this.failAll(thread, error));
    worker.on("exit", () => this.failAll(thread, new Error("the file system writer thread exited")));
    this.thread = thread;
    return thread;
  }

  /**
   * One Atomics.waitAsync for the next completion while batches are out: it returns at once when an
   * operation was done since the last takeDone (DONE_OPS no longer equals settledOps), and otherwise the
   * thread's next notify ends it (fs-write-protocol.ts).
   */
  private awaitCompletion(thread: Thread): void {
    if (thread.waiting || thread.inflight.length === 0) return;
    const outcome = Atomics.waitAsync(thread.doorbell, DOORBELL_DONE_OPS, thread.settledOps);
    thread.waiting = true;
    const onWake = () => {
      thread.waiting = false;
      if (this.thread === thread) this.complete(thread);
    };
    if (outcome.async) void outcome.value.then(onWake);
    else queueMicrotask(onWake);
  }

  private complete(thread: Thread): void {
    const settled = this.takeDone(thread);
    this.sendWhileSlotsFree();
    if (thread.inflight.length === 0) {
      thread.worker.unref();
      if (this.references === 0) this.stopWhenIdle();
    }
    this.awaitCompletion(thread);
    settle(settled);
  }

  /**
   * The operations the thread reports done and this side has not settled yet, with their outcomes, in
   * issue order; a batch all of whose operations are taken leaves `inflight` (its slot is free again).
   * The outcomes are read here, before the slot can take a new batch.
   */
  private takeDone(thread: Thread): Settled {
    const doneOps = Atomics.load(thread.doorbell, DOORBELL_DONE_OPS);
    let count = (doneOps - thread.settledOps) | 0;
    assert(count >= 0, "the writer thread reports fewer operations done than were settled");
    const settled: Settled = { ops: [], errnos: [] };
    while (count > 0) {
      const ops = thread.inflight[0];
      const results = thread.resultTables[thread.completed % slotCount];
      assert(ops && results, "a completion for a batch that is in flight");
      const end = Math.min(ops.length, thread.settledInBatch + count);
      for (let index = thread.settledInBatch; index < end; index++) {
        settled.ops.push(ops[index]!);
        settled.errnos.push(results[index] ?? 0);
      }
      count -= end - thread.settledInBatch;
      thread.settledInBatch = end;
      if (end === ops.length) {
        thread.inflight.shift();
        thread.completed++;
        thread.settledInBatch = 0;
      }
    }
    thread.settledOps = doneOps;
    return settled;
  }

  private failAll(thread: Thread, cause: Error): void {
    if (this.thread !== thread) return;
    this.thread = null;
    // What the thread reported done before it died was written: settle it as such.
    settle(this.takeDone(thread));
    const batches = thread.inflight.splice(0);
    batches.forEach((ops, index) => {
      for (const op of index === 0 ? ops.slice(thread.settledInBatch) : ops) {
        op.reject(new BlockError("EIO", `file system writer failed: ${cause.message}`));
      }
    });
    // Operations not submitted yet go to the next thread.
    this.sendWhileSlotsFree();
  }

  private stopWhenIdle(): void {
    const thread = this.thread;
    if (this.references > 0 || this.pending.length > 0 || !thread || thread.inflight.length > 0) return;
    this.thread = null;
    void thread.worker.terminate();
  }
}

/** Operations taken as done, and their outcomes (0 or a negative errno), in issue order. */
interface Settled {
  readonly ops: PendingOp[];
  readonly errnos: number[];
}

function settle({ ops, errnos }: Settled): void {
  ops.forEach((op, index) => {
    const errno = errnos[index] ?? 0;
    if (errno === 0) op.resolve();
    else op.reject(systemError(errno));
  });
}

/** An error as the synchronous fs calls throw it, from Node's negative errno (the backend adds the context). */
function systemError(errno: number): Error {
  const [code, description] = getSystemErrorMap().get(errno) ?? ["EIO", "i/o error"];
  return Object.assign(new Error(`${code}: ${description}`), { code });
}
