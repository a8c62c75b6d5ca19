/**
 * Messages between a FileSystemWriter (fs-writer.ts) and its thread (fs-writer-worker.ts). A batch is
 * a flat table of operations (opFields numbers each, transferred) and a shared staging buffer with the
 * payloads of its writes (the writer reuses it once the reply came). The reply names only the operations that failed.
 */

export const opFields = 5;
export const OP_WRITE = 0;
export const OP_EXTEND = 1;
/** Writes zeroes from the thread's own buffer: length in the length field, no payload. */
export const OP_ZERO = 2;

export interface WriteBatch {
  readonly batchId: number;
  /** Per operation: kind, fd, position in the file, offset of its payload in `data`, length. */
  readonly ops: Float64Array;
  readonly data: SharedArrayBuffer;
}

export interface BatchFailure {
  readonly index: number;
  readonly code: string;
  readonly message: string;
}

export interface BatchReply {
  readonly batchId: number;
  readonly failures: readonly BatchFailure[];
}
