/**
 * ObjectStore: the storage a backup repository sits on, reduced to what an object store offers (put, get,
 * head, list, delete of whole immutable objects by key). The local directory store implements it now; the
 * S3 store of issue 14 implements the same interface, so the repository code never touches paths.
 *
 * Keys are `/`-separated, made of [A-Za-z0-9._-] segments, never starting with `.` (so temporary files of a
 * store never collide with keys). A put is atomic: a reader sees the whole object or none of it.
 */
import { BlockError } from "../block/errors.js";

export interface ObjectInfo {
  readonly key: string;
  readonly sizeBytes: number;
  readonly modifiedMs: number;
}

export interface ObjectStore {
  /** A description for messages (the directory path, the s3:// URL). */
  readonly location: string;
  /**
   * Set by remote stores (S3): identifies the repository (endpoint, bucket, prefix) for a local index of
   * its chunks (chunk-index.ts), so existence checks cost no request. Absent for a local directory.
   */
  readonly cacheIdentity?: string;
  /** How many requests a caller should keep in flight to keep a remote store busy (absent: local). */
  readonly inFlightHint?: number;
  /** Stores `data` under `key` atomically and durably; replaces an existing object. */
  put(key: string, data: Uint8Array): Promise<void>;
  /**
   * The whole object; ENOENT when absent. `contentChecked`: the caller verifies the content itself (a
   * content-named chunk), so a store may skip its own transfer checksum.
   */
  get(key: string, options?: { readonly contentChecked?: boolean }): Promise<Uint8Array>;
  /**
   * Optional (local stores): stores `data` under `key` without waiting for it to be durable. The object
   * stays invisible (a temporary file) until it is durable, then appears atomically: at the latest when
   * syncPending() returns, earlier when the store flushes a full batch. A crash before that loses it
   * whole; it never leaves an object of the right name with the wrong bytes.
   */
  putPending?(key: string, data: Uint8Array): Promise<void>;
  /** Makes every putPending object durable and visible; on failure none of the failed batch appears. */
  syncPending?(): Promise<void>;
  /**
   * Optional: reads the whole object into `target` and returns its length, without allocating a buffer per
   * object (local stores); ENOENT when absent, EIO when it does not fit. Callers fall back to get().
   */
  getInto?(key: string, target: Uint8Array): Promise<number>;
  /** Size and time of the object, or null when absent. */
  head(key: string): Promise<ObjectInfo | null>;
  /** Every object whose key starts with `prefix`, in no particular order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /** Removes the object; absent is not an error. */
  delete(key: string): Promise<void>;
}

/** The store itself is absent (an S3 bucket that does not exist): not one missing object. */
export class StoreMissingError extends BlockError {
  constructor(message: string) {
    super("ENOENT", message);
  }
}

const keyPattern = /^[A-Za-z0-9_-][A-Za-z0-9._-]*(\/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$/;
const keyLengthMax = 512;

export function checkObjectKey(key: string): void {
  if (key.length > keyLengthMax || !keyPattern.test(key))
    throw new BlockError("EINVAL", `Invalid object key ${JSON.stringify(key)}`);
}
