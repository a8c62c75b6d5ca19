/**
 * What the main thread and the /dev/fuse reader workers share: a worker's start data, the messages it
 * posts, the direct-read registrations the main thread sends it, and the layout of the shared control
 * array (Int32Array over a SharedArrayBuffer).
 *
 * Several readers serve one connection (FuseChannel's readerThreads). Each owns a contiguous range of the
 * slots (no slot is shared), its own release counter, its own direct-read port and post counter; the
 * stop flag is common.
 */
import type { MessagePort } from "node:worker_threads";

export interface FuseReaderWorkerData {
  readonly fd: number;
  /** All readers' request (and reply) buffers: totalSlotCount × slotBytes. */
  readonly slots: SharedArrayBuffer;
  readonly slotBytes: number;
  /** This reader's slots: [firstSlot, firstSlot + slotCount), numbered across all readers. */
  readonly firstSlot: number;
  readonly slotCount: number;
  /** Int32Array: see readerControl and readerLayout. */
  readonly control: SharedArrayBuffer;
  readonly layout: ReaderLayout;
  /** DirectReadMessages from the main thread; the worker drains it synchronously (receiveMessageOnPort). */
  readonly directReads: MessagePort;
  /**
   * Direct READs larger than 64 KiB that all readers together may serve at once (readerControl
   * .largeReadsInPlace counts them); one more goes to the main thread. Readers − 1, so that one reader
   * always stays free for small requests while the others copy megabytes or wait for a slow disk.
   */
  readonly largeReadsInPlaceMax: number;
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
 * main thread owns `fd` and closes it once no reader can still be using it: at once for readers that were
 * not busy when the "close" was posted (ReaderLayout.busyIndex), after the acknowledgement (or its end)
 * for the others. A reader acknowledges every "close" it sees; the main thread ignores the ones it did not
 * wait for.
 */
export type DirectReadMessage =
  | { readonly kind: "open"; readonly handle: bigint; readonly fd: number; readonly sizeBytes: number }
  | { readonly kind: "close"; readonly handle: bigint };

/** Common indexes into the control array. */
export const readerControl = {
  /** Non-zero: every reader stops before its next read. */
  stop: 0,
  /** Large direct READs being served by readers right now (FuseReaderWorkerData.largeReadsInPlaceMax). */
  largeReadsInPlace: 1,
} as const;

const commonEntries = 2;

/** Where one reader's counters and the slot states sit in the control array. */
export interface ReaderLayout {
  /** Incremented on every release of one of the reader's slots; it sleeps on it when all are busy. */
  readonly releasesIndex: number;
  /** Incremented after every DirectReadMessage posted to it: it drains its port only when it moved. */
  readonly directReadPostsIndex: number;
  /**
   * 1 from the return of a read of /dev/fuse until the request is served or posted, then 0 and one more
   * look at the port. A "close" posted while this reads 0 needs no acknowledgement: the reader looks at
   * its port before it serves anything again. Posted while 1, it is acknowledged before the flag drops.
   */
  readonly busyIndex: number;
  /** Index of slot 0's state (0 free, 1 busy); slot N's is slotStatesIndex + N. */
  readonly slotStatesIndex: number;
}

const perReaderEntries = 3;

export function readerLayout(readerIndex: number, readerCount: number): ReaderLayout {
  const base = commonEntries + perReaderEntries * readerIndex;
  return {
    releasesIndex: base,
    directReadPostsIndex: base + 1,
    busyIndex: base + 2,
    slotStatesIndex: commonEntries + perReaderEntries * readerCount,
  };
}

export function controlBytes(readerCount: number, totalSlotCount: number): number {
  return (commonEntries + perReaderEntries * readerCount + totalSlotCount) * Int32Array.BYTES_PER_ELEMENT;
}
