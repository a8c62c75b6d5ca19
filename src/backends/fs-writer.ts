/**
 * FileSystemWriter: the writes and extensions of every file on one file system (or one block device) run
 * on one thread of their own, off the event loop. A write to a file system under `fsfreeze -f`, or to a
 * dying disk, blocks in the kernel until it recovers; on the event loop that stalled every device and the
 * control API, and in the libuv pool (4 threads, shared with everything) a few such writes stalled every
 * other file. One thread per file system confines a stall to the files that are stalled anyway, and lets
 * the event loop and the writes use both cores.
 *
 * Batching: operations issued in one turn of the event loop go to the thread as one message (payloads
 * copied into a reused shared staging buffer, at most batchBytesMax per batch), and come back as one reply, so a
 * queue of 4 KiB writes costs one wake-up per batch instead of one per write (a hop through the libuv
 * pool per write cost 4x the IOPS of synchronous writes here). With two batches out, the next one waits for
 * a reply and collects what arrives meanwhile. Operations run in issue order.
 *
 * Lifetime: a writer is shared by reference count (acquire/release by the file backends); its thread
 * starts on first use, is referenced only while batches are out (an idle writer never keeps the process
 * alive), and ends when the last file releases it. A thread that dies fails its batches with EIO and is
 * replaced on next use. Not done yet: payloads are copied once into the batch (a SharedArrayBuffer-backed
 * request buffer could be written in place).
 */
import { Worker } from "node:worker_threads";
import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import {
  type BatchReply,
  OP_EXTEND,
  OP_WRITE,
  OP_ZERO,
  opFields,
  type WriteBatch,
} from "./fs-write-protocol.js";

/** Payload bytes per batch: larger writes go alone in a batch of their own. */
export const batchBytesMax = 4 << 20;
/** Batches sent and not answered, beyond which new operations wait for a reply (a full batch goes anyway). */
const batchesInFlightMax = 2;
/** Idle staging buffers kept per writer (batchBytesMax each). */
const stagingBuffersKept = 4;

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

export class FileSystemWriter {
  private static readonly writers = new Map<string, FileSystemWriter>();

  /** The writer of the file system (or block device) named by `key`; release() when done with it. */
  static acquire(key: string): FileSystemWriter {
    let writer = FileSystemWriter.writers.get(key);
    if (!writer) {
      writer = new FileSystemWriter(key);
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
  private worker: Worker | null = null;
  private batch: PendingOp[] = [];
  private batchBytes = 0;
  private sendScheduled = false;
  private nextBatchId = 1;
  private readonly inflight = new Map<number, { ops: PendingOp[]; staging: SharedArrayBuffer }>();
  private readonly freeStaging: SharedArrayBuffer[] = [];

  private constructor(key: string) {
    this.key = key;
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
    const lengthBytes = source?.byteLength ?? 0;
    if (this.batch.length > 0 && this.batchBytes + lengthBytes > batchBytesMax) this.send();
    return new Promise<void>((resolve, reject) => {
      this.batch.push({ kind, fd, positionBytes, source, zeroLengthBytes, resolve, reject });
      this.batchBytes += lengthBytes;
      if (!this.sendScheduled) {
        this.sendScheduled = true;
        setImmediate(() => {
          this.sendScheduled = false;
          // With enough batches out, the next one waits for a reply and grows meanwhile (fewer wake-ups).
          if (this.batch.length > 0 && this.inflight.size < batchesInFlightMax) this.send();
        });
      }
    });
  }

  private send(): void {
    const ops = this.batch;
    this.batch = [];
    const table = new Float64Array(ops.length * opFields);
    const staging = this.takeStaging(this.batchBytes);
    const data = new Uint8Array(staging, 0, this.batchBytes);
    this.batchBytes = 0;
    let dataOffsetBytes = 0;
    ops.forEach((op, index) => {
      const base = index * opFields;
      const payloadBytes = op.source?.byteLength ?? 0;
      table[base] = op.kind;
      table[base + 1] = op.fd;
      table[base + 2] = op.positionBytes;
      table[base + 3] = dataOffsetBytes;
      table[base + 4] = op.source ? payloadBytes : op.zeroLengthBytes;
      if (op.source) data.set(op.source, dataOffsetBytes);
      dataOffsetBytes += payloadBytes;
    });
    const batchId = this.nextBatchId++;
    const worker = this.workerOrStart();
    if (this.inflight.size === 0) worker.ref();
    this.inflight.set(batchId, { ops, staging });
    const message: WriteBatch = { batchId, ops: table, data: staging };
    worker.postMessage(message, [table.buffer]);
  }

  /**
   * A staging buffer for a batch's payloads: reused, because a fresh one per batch cost more in page
   * faults than the writes themselves (4 MiB: ~5 ms of faults and zeroing against ~1 ms of copying).
   */
  private takeStaging(lengthBytes: number): SharedArrayBuffer {
    if (lengthBytes <= batchBytesMax) {
      const reused = this.freeStaging.pop();
      if (reused) return reused;
    }
    return new SharedArrayBuffer(Math.max(lengthBytes, batchBytesMax));
  }

  private giveStaging(staging: SharedArrayBuffer): void {
    if (staging.byteLength === batchBytesMax && this.freeStaging.length < stagingBuffersKept)
      this.freeStaging.push(staging);
  }

  private workerOrStart(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL("./fs-writer-worker.js", import.meta.url));
    worker.unref();
    worker.on("message", (reply: BatchReply) => this.complete(reply));
    worker.on("error", (error) => this.failAll(worker, error));
    worker.on("exit", () => this.failAll(worker, new Error("the file system writer thread exited")));
    this.worker = worker;
    return worker;
  }

  private complete(reply: BatchReply): void {
    const batch = this.inflight.get(reply.batchId);
    assert(batch, "a reply for a batch that is not in flight");
    this.inflight.delete(reply.batchId);
    this.giveStaging(batch.staging);
    if (this.batch.length > 0 && !this.sendScheduled) this.send();
    const ops = batch.ops;
    if (this.inflight.size === 0) {
      this.worker?.unref();
      if (this.references === 0) this.stopWhenIdle();
    }
    const failed = new Map(reply.failures.map((failure) => [failure.index, failure]));
    for (const [index, op] of ops.entries()) {
      const failure = failed.get(index);
      // The backend adds which file and offset; the errno stays the kernel's.
      if (failure) op.reject(Object.assign(new Error(failure.message), { code: failure.code }));
      else op.resolve();
    }
  }

  private failAll(worker: Worker, cause: Error): void {
    if (this.worker !== worker) return;
    this.worker = null;
    const batches = [...this.inflight.values()];
    this.inflight.clear();
    for (const { ops } of batches) {
      for (const op of ops) op.reject(new BlockError("EIO", `file system writer failed: ${cause.message}`));
    }
  }

  private stopWhenIdle(): void {
    if (this.references > 0 || this.inflight.size > 0 || this.batch.length > 0 || !this.worker) return;
    const worker = this.worker;
    this.worker = null;
    void worker.terminate();
  }
}
