/**
 * CodecPool: a fixed pool of codec worker threads (default 2, one per core of the target machine). Each
 * request goes to the worker with the fewest outstanding requests. Callers bound their own concurrency
 * (the backup and restore pipelines keep a few chunks in flight); the pool does not queue beyond that.
 *
 * A worker that dies (it should not: errors are returned, not thrown) fails its outstanding requests with
 * EIO and is replaced on the next request. close() ends every worker.
 */
import { Worker } from "node:worker_threads";
import { BlockError } from "../block/errors.js";
import type { CodecKeys } from "./chunk-codec.js";
import type { CodecRequest, CodecResponse, CodecWorkerData } from "./codec-protocol.js";

export const codecWorkersDefault = 2;

interface Pending {
  resolve(response: CodecResponse & { ok: true }): void;
  reject(error: Error): void;
}

interface Slot {
  worker: Worker | null;
  readonly pending: Map<number, Pending>;
}

type RequestBody = CodecRequest extends infer R
  ? R extends { seq: number }
    ? Omit<R, "seq">
    : never
  : never;

export class CodecPool {
  private readonly slots: Slot[];
  private readonly workerData: CodecWorkerData;
  private seq = 0;
  private closed = false;

  constructor(keys: CodecKeys | null, plainLengthMax: number, workerCount = codecWorkersDefault) {
    this.workerData = { keys, plainLengthMax };
    this.slots = Array.from({ length: workerCount }, () => ({ worker: null, pending: new Map() }));
  }

  /**
   * Hashes, compresses and encrypts; `stored` is null for an all-zero chunk (stored as nothing).
   * `handOver`: the caller gives `plain` away — its memory moves to the worker instead of being copied, and
   * `plain` is empty afterwards (only when it owns its whole ArrayBuffer; else it is copied as usual).
   */
  async encode(
    plain: Uint8Array,
    options: { handOver?: boolean } = {},
  ): Promise<{ id: string; stored: Uint8Array | null }> {
    const response = await this.call({ op: "encode", plain }, options.handOver ? wholeBuffer(plain) : []);
    return { id: response.id ?? "", stored: response.stored ?? null };
  }

  /** `handOver` as for encode: `stored` moves to the worker when the caller needs it no more. */
  async decode(
    stored: Uint8Array,
    name: string,
    expectedId: string | null,
    options: { handOver?: boolean } = {},
  ): Promise<Uint8Array> {
    const response = await this.call(
      { op: "decode", stored, name, expectedId },
      options.handOver ? wholeBuffer(stored) : [],
    );
    return response.plain ?? new Uint8Array(0);
  }

  /**
   * encode into shared buffers (chunk-slots.ts): `plain` is read and `out` written in place by the worker.
   * `storedLength` is null for an all-zero chunk (stored as nothing).
   */
  async encodeInto(plain: Uint8Array, out: Uint8Array): Promise<{ id: string; storedLength: number | null }> {
    checkShared(plain);
    checkShared(out);
    const response = await this.call({ op: "encodeInto", plain, out });
    return { id: response.id ?? "", storedLength: response.storedLength ?? null };
  }

  /** decode into shared buffers; returns the plain length in `out`. Clobbers `stored` when encrypted. */
  async decodeInto(
    stored: Uint8Array,
    out: Uint8Array,
    name: string,
    expectedId: string | null,
  ): Promise<number> {
    checkShared(stored);
    checkShared(out);
    const response = await this.call({ op: "decodeInto", stored, out, name, expectedId });
    return response.plainLength ?? 0;
  }

  async check(stored: Uint8Array, name: string): Promise<void> {
    await this.call({ op: "check", stored, name });
  }

  async zeroId(lengthBytes: number): Promise<string> {
    return (await this.call({ op: "zeroId", lengthBytes })).id ?? "";
  }

  private call(body: RequestBody, transfer: ArrayBuffer[] = []): Promise<CodecResponse & { ok: true }> {
    if (this.closed) return Promise.reject(new BlockError("ESHUTDOWN", "Codec pool is closed"));
    this.seq += 1;
    const seq = this.seq;
    let slot = this.slots[0] as Slot;
    for (const candidate of this.slots) if (candidate.pending.size < slot.pending.size) slot = candidate;
    const worker = this.workerOf(slot);
    return new Promise((resolve, reject) => {
      // Referenced only while it has work, so an idle pool never keeps the process alive.
      if (slot.pending.size === 0) worker.ref();
      slot.pending.set(seq, { resolve, reject });
      worker.postMessage({ ...body, seq } as CodecRequest, transfer);
    });
  }

  private workerOf(slot: Slot): Worker {
    if (slot.worker !== null) return slot.worker;
    const worker = new Worker(new URL("./codec-worker.js", import.meta.url), { workerData: this.workerData });
    worker.unref();
    worker.on("message", (response: CodecResponse) => {
      const pending = slot.pending.get(response.seq);
      if (pending === undefined) return;
      slot.pending.delete(response.seq);
      if (slot.pending.size === 0) worker.unref();
      if (response.ok) pending.resolve(response);
      else pending.reject(new BlockError(response.errno, response.message));
    });
    const fail = (error: Error) => {
      if (slot.worker === worker) slot.worker = null;
      for (const pending of slot.pending.values())
        pending.reject(new BlockError("EIO", `Codec worker failed: ${error.message}`));
      slot.pending.clear();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`exited with code ${code}`)));
    slot.worker = worker;
    return worker;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(
      this.slots.map(async (slot) => {
        const worker = slot.worker;
        slot.worker = null;
        if (worker !== null) await worker.terminate();
      }),
    );
  }
}

/** A view of an ArrayBuffer would be copied to the worker, and the worker's writes lost. */
function checkShared(view: Uint8Array): void {
  if (!(view.buffer instanceof SharedArrayBuffer))
    throw new BlockError("EINVAL", "encodeInto/decodeInto take views of SharedArrayBuffers");
}

/** The buffer's ArrayBuffer when the view covers all of it (a pooled Buffer's is shared: never moved). */
function wholeBuffer(view: Uint8Array): ArrayBuffer[] {
  const backing = view.buffer;
  return backing instanceof ArrayBuffer && view.byteOffset === 0 && view.byteLength === backing.byteLength
    ? [backing]
    : [];
}
