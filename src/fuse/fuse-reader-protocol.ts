/**
 * What the main thread and the /dev/fuse reader worker share: the worker's start data, the messages it
 * posts, the direct-read registrations the main thread sends it, and the layout of the shared control
 * array (Int32Array over a SharedArrayBuffer).
 */
import type { MessagePort } from "node:worker_threads";

export interface FuseReaderWorkerData {
  readonly fd: number;
  /** slotCount × slotBytes of request (and reply) buffers. */
  readonly slots: SharedArrayBuffer;
  readonly slotCount: number;
  readonly slotBytes: number;
  /** Int32Array: see readerControl. */
  readonly control: SharedArrayBuffer;
  /** DirectReadMessages from the main thread; the worker drains it synchronously (receiveMessageOnPort). */
  readonly directReads: MessagePort;
}

export type FuseReaderMessage =
  | { readonly kind: "request"; readonly slot: number; readonly lengthBytes: number }
  /** The connection is gone (read returned ENODEV): unmounted or aborted. */
  | { readonly kind: "closed" }
  | { readonly kind: "failed"; readonly code: string; readonly message: string }
  /** A reply the worker wrote itself (a direct read) was refused by the kernel. */
  | { readonly kind: "replyFailed"; readonly code: string; readonly message: string }
  /** The worker saw the "close" of `handle` and will not touch its descriptor again. */
  | { readonly kind: "directReadClosed"; readonly handle: bigint };

/**
 * READs on file handle `handle` may be served by the worker from `fd` over a device of `sizeBytes`. The
 * main thread owns `fd` and closes it once the worker has acknowledged the "close" (or has ended).
 */
export type DirectReadMessage =
  | { readonly kind: "open"; readonly handle: bigint; readonly fd: number; readonly sizeBytes: number }
  | { readonly kind: "close"; readonly handle: bigint };

/** Indexes into the control array. */
export const readerControl = {
  /** Incremented on every slot release; the worker sleeps on it when all slots are busy. */
  releases: 0,
  /** Non-zero: the worker stops before its next read. */
  stop: 1,
  /** Incremented after every DirectReadMessage posted: the worker drains its port only when it moved. */
  directReadPosts: 2,
  /** slotCount entries follow: 0 free, 1 busy. */
  firstSlot: 3,
} as const;

export function controlBytes(slotCount: number): number {
  return (readerControl.firstSlot + slotCount) * Int32Array.BYTES_PER_ELEMENT;
}
