/**
 * What the main thread and the /dev/fuse reader worker share: the worker's start data, the messages it
 * posts, and the layout of the shared control array (Int32Array over a SharedArrayBuffer).
 */

export interface FuseReaderWorkerData {
  readonly fd: number;
  /** slotCount × slotBytes of request (and reply) buffers. */
  readonly slots: SharedArrayBuffer;
  readonly slotCount: number;
  readonly slotBytes: number;
  /** Int32Array: see readerControl. */
  readonly control: SharedArrayBuffer;
}

export type FuseReaderMessage =
  | { readonly kind: "request"; readonly slot: number; readonly lengthBytes: number }
  /** The connection is gone (read returned ENODEV): unmounted or aborted. */
  | { readonly kind: "closed" }
  | { readonly kind: "failed"; readonly code: string; readonly message: string };

/** Indexes into the control array. */
export const readerControl = {
  /** Incremented on every slot release; the worker sleeps on it when all slots are busy. */
  releases: 0,
  /** Non-zero: the worker stops before its next read. */
  stop: 1,
  /** slotCount entries follow: 0 free, 1 busy. */
  firstSlot: 2,
} as const;

export function controlBytes(slotCount: number): number {
  return (readerControl.firstSlot + slotCount) * Int32Array.BYTES_PER_ELEMENT;
}
