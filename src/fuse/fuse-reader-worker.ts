/**
 * A /dev/fuse reader thread. A read of /dev/fuse blocks until the kernel has a request; done on the main
 * thread it would stall the event loop, done through the libuv pool it would hold a pool thread forever.
 * So a worker thread loops: take a free slot of its own range of the shared buffer, read(2) one request
 * into it, post "slot N holds L bytes" to the main thread, which serves the request and frees the slot.
 * FuseChannel may run several of these on the same descriptor: the kernel hands each request to exactly
 * one blocked reader, and a reply may be written by any thread, so readers share nothing but the stop
 * flag (fuse-reader-protocol.ts).
 *
 * Direct reads: a READ on a file handle the main thread registered (DirectReadMessage: an origin over a
 * plain file, see BlockDevice.directReadFd) is served here — pread(2) into the slot, one write(2) of the
 * reply — without the hop to the main thread, which halves the threads woken per 4 KiB read. Reads over
 * 64 KiB are served here too while fewer than readers − 1 of them are in progress across all readers
 * (a shared counter, FuseReaderWorkerData.largeReadsInPlaceMax), else they go to the main thread: a
 * 1 MiB read costs about a third less CPU here and the copies spread over the readers instead of all
 * passing the event loop, and one reader always stays free for small requests while the others copy
 * megabytes or wait for a slow disk (with one reader every large read goes to the main thread, where the
 * backend moves slow ones to the libuv pool). Registrations are applied before each request is looked at, and
 * the main thread posts them before it answers the OPEN (and withdraws them before it answers the
 * RELEASE), so no READ can overtake its handle's registration. The descriptors belong to the main thread,
 * which closes one once this worker is not busy or has acknowledged its withdrawal ("directReadClosed";
 * the busy flag: fuse-reader-protocol.ts).
 *
 * Slot states live in a shared Int32Array (FuseReaderControl): 0 free, 1 owned by a request. When every
 * slot is taken the worker sleeps on the release counter (Atomics.wait); this bounds the requests in
 * flight, and the kernel keeps the rest queued. It ends when the connection is gone (ENODEV: unmounted or
 * aborted) or when asked to stop, and never touches the file system itself. It may start before mount(2)
 * has attached the descriptor (reads fail with EPERM until then) and polls until it has.
 */
import { readSync, writeSync } from "node:fs";
import { type MessagePort, parentPort, receiveMessageOnPort, workerData } from "node:worker_threads";
import { fuseErrorOf } from "./errno-map.js";
import * as abi from "./fuse-abi.js";
import {
  type DirectReadMessage,
  type FuseReaderMessage,
  type FuseReaderWorkerData,
  type ReaderLayout,
  readerControl,
} from "./fuse-reader-protocol.js";

const notMountedPollMs = 2;
/** READs up to this size are always served here; larger ones only within largeReadsInPlaceMax. */
const smallReadBytesMax = 64 * 1024;
const twoPower32 = 2 ** 32;
/** A 64-bit value whose high half is below this is a safe integer. */
const twoPower21 = 2 ** 21;
const maxSafeHandle = BigInt(Number.MAX_SAFE_INTEGER);

interface DirectFile {
  readonly fd: number;
  readonly sizeBytes: number;
}

class DirectReads {
  /** By handle; handles above 2^53 are never registered (their READs go to the main thread). */
  private readonly files = new Map<number, DirectFile>();
  private seenPosts = 0;
  private readonly port: MessagePort;
  private readonly control: Int32Array;
  private readonly postsIndex: number;
  private readonly post: (message: FuseReaderMessage) => void;

  constructor(
    port: MessagePort,
    control: Int32Array,
    postsIndex: number,
    post: (message: FuseReaderMessage) => void,
  ) {
    this.port = port;
    this.control = control;
    this.postsIndex = postsIndex;
    this.post = post;
  }

  get isEmpty(): boolean {
    return this.files.size === 0;
  }

  /** Applies every registration posted so far (cheap when none was: one atomic load). */
  sync(): void {
    const posts = Atomics.load(this.control, this.postsIndex);
    if (posts === this.seenPosts) return;
    this.seenPosts = posts;
    for (;;) {
      const received = receiveMessageOnPort(this.port);
      if (!received) return;
      const message = received.message as DirectReadMessage;
      if (message.kind === "open") {
        if (message.handle <= maxSafeHandle) {
          this.files.set(Number(message.handle), { fd: message.fd, sizeBytes: message.sizeBytes });
        }
      } else {
        this.files.delete(Number(message.handle));
        this.post({ kind: "directReadClosed", handle: message.handle });
      }
    }
  }

  /** The file of the handle whose 32-bit halves are `low` and `high`. */
  find(low: number, high: number): DirectFile | undefined {
    return high < twoPower21 ? this.files.get(high * twoPower32 + low) : undefined;
  }
}

function main(): void {
  const port = parentPort;
  if (!port) throw new Error("fuse-reader-worker must run as a worker thread");
  const data = workerData as FuseReaderWorkerData;
  const control = new Int32Array(data.control);
  const { layout } = data;
  const slots: Uint8Array[] = [];
  // One view per slot, made once: the hot path allocates nothing per request.
  const views: DataView[] = [];
  for (let index = 0; index < data.slotCount; index += 1) {
    const offsetBytes = (data.firstSlot + index) * data.slotBytes;
    slots.push(new Uint8Array(data.slots, offsetBytes, data.slotBytes));
    views.push(new DataView(data.slots, offsetBytes, data.slotBytes));
  }
  const post = (message: FuseReaderMessage) => port.postMessage(message);
  const directReads = new DirectReads(data.directReads, control, layout.directReadPostsIndex, post);
  let next = 0;
  let mounted = false;
  for (;;) {
    const index = acquireSlot(control, data, next);
    if (index < 0) break;
    next = (index + 1) % data.slotCount;
    const slot = data.firstSlot + index;
    const buffer = slots[index]!;
    let lengthBytes: number;
    try {
      lengthBytes = readSync(data.fd, buffer, 0, data.slotBytes, null);
    } catch (error) {
      releaseSlot(control, layout, slot);
      const code = (error as NodeJS.ErrnoException).code ?? "EIO";
      // ENOENT: the request was interrupted before we read it; EINTR/EAGAIN: try again.
      if (code === "ENOENT" || code === "EINTR" || code === "EAGAIN") continue;
      // EPERM until mount(2) has attached the descriptor to a connection: we start before mount runs.
      if (code === "EPERM" && !mounted) {
        Atomics.wait(control, readerControl.stop, 0, notMountedPollMs);
        continue;
      }
      if (code === "ENODEV") post({ kind: "closed" });
      else post({ kind: "failed", code, message: String(error) });
      break;
    }
    mounted = true;
    Atomics.store(control, layout.busyIndex, 1);
    // After the read: a registration posted before the kernel could send this READ is seen now.
    directReads.sync();
    if (
      !directReads.isEmpty &&
      serveDirectRead(data, control, buffer, views[index]!, lengthBytes, directReads, post)
    ) {
      releaseSlot(control, layout, slot);
    } else {
      post({ kind: "request", slot, lengthBytes });
    }
    // Flag down first, then look: a "close" posted while the flag was up is acknowledged now, not at
    // the next request, which may be long in coming.
    Atomics.store(control, layout.busyIndex, 0);
    directReads.sync();
  }
}

/** Serves a READ on a registered handle in place; false when the request is not one (the main thread's). */
function serveDirectRead(
  data: FuseReaderWorkerData,
  control: Int32Array,
  buffer: Uint8Array,
  view: DataView,
  lengthBytes: number,
  directReads: DirectReads,
  post: (message: FuseReaderMessage) => void,
): boolean {
  if (lengthBytes < abi.FUSE_IN_HEADER_BYTES + abi.FUSE_READ_IN_BYTES) return false;
  if (view.getUint32(4, true) !== abi.FUSE_READ) return false;
  const at = abi.FUSE_IN_HEADER_BYTES;
  // 64-bit fields in 32-bit halves: no BigInt per request.
  const file = directReads.find(view.getUint32(at, true), view.getUint32(at + 4, true));
  if (!file) return false;
  const offsetHigh = view.getUint32(at + 12, true);
  const requestedBytes = view.getUint32(at + 16, true);
  if (requestedBytes <= smallReadBytesMax) {
    serveRead(data, buffer, view, file, offsetHigh, requestedBytes, post);
    return true;
  }
  if (!takeLargeReadToken(control, data.largeReadsInPlaceMax)) return false;
  try {
    serveRead(data, buffer, view, file, offsetHigh, requestedBytes, post);
  } finally {
    Atomics.sub(control, readerControl.largeReadsInPlace, 1);
  }
  return true;
}

/** One more large read in place unless largeReadsInPlaceMax are already in progress. */
function takeLargeReadToken(control: Int32Array, largeReadsInPlaceMax: number): boolean {
  for (;;) {
    const inPlace = Atomics.load(control, readerControl.largeReadsInPlace);
    if (inPlace >= largeReadsInPlaceMax) return false;
    if (Atomics.compareExchange(control, readerControl.largeReadsInPlace, inPlace, inPlace + 1) === inPlace) {
      return true;
    }
  }
}

/** pread(2) into the slot after the reply header, then one write(2) of the reply. */
function serveRead(
  data: FuseReaderWorkerData,
  buffer: Uint8Array,
  view: DataView,
  file: DirectFile,
  offsetHigh: number,
  requestedBytes: number,
  post: (message: FuseReaderMessage) => void,
): void {
  const at = abi.FUSE_IN_HEADER_BYTES;
  const start = abi.FUSE_OUT_HEADER_BYTES;
  let readBytes = 0;
  let error = 0;
  // An offset of 2^53 or more is past the end of any device (sizes are safe integers).
  const offsetBytes =
    offsetHigh < twoPower21 ? offsetHigh * twoPower32 + view.getUint32(at + 8, true) : Infinity;
  if (offsetBytes < file.sizeBytes) {
    readBytes = Math.min(requestedBytes, file.sizeBytes - offsetBytes, buffer.byteLength - start);
    error = preadFully(file.fd, buffer, start, readBytes, offsetBytes);
  }
  // The reply header overlays the request header; `unique` (bytes 8-15) is already in place.
  const replyBytes = start + (error === 0 ? readBytes : 0);
  view.setUint32(0, replyBytes, true);
  view.setInt32(4, error, true);
  try {
    writeSync(data.fd, buffer, 0, replyBytes);
  } catch (writeError) {
    const code = (writeError as NodeJS.ErrnoException).code ?? "EIO";
    // ENOENT: the request was interrupted meanwhile; ENODEV: the connection is gone.
    if (code !== "ENOENT" && code !== "ENODEV") {
      post({ kind: "replyFailed", code, message: String(writeError) });
    }
  }
}

/**
 * Reads `lengthBytes` at `offsetBytes` into `target` from `startBytes`; past the end of the file reads
 * zeroes. 0 or -errno.
 */
function preadFully(
  fd: number,
  target: Uint8Array,
  startBytes: number,
  lengthBytes: number,
  offsetBytes: number,
): number {
  let doneBytes = 0;
  try {
    while (doneBytes < lengthBytes) {
      const n = readSync(
        fd,
        target,
        startBytes + doneBytes,
        lengthBytes - doneBytes,
        offsetBytes + doneBytes,
      );
      if (n === 0) break;
      doneBytes += n;
    }
  } catch (error) {
    return fuseErrorOf(error);
  }
  if (doneBytes < lengthBytes) target.fill(0, startBytes + doneBytes, startBytes + lengthBytes);
  return 0;
}

/**
 * A free slot of this reader's range (its index in the range), marked busy; -1 when asked to stop.
 * Sleeps while every one is busy.
 */
function acquireSlot(control: Int32Array, data: FuseReaderWorkerData, start: number): number {
  const { layout } = data;
  for (;;) {
    if (Atomics.load(control, readerControl.stop) !== 0) return -1;
    const generation = Atomics.load(control, layout.releasesIndex);
    for (let step = 0; step < data.slotCount; step += 1) {
      const index = (start + step) % data.slotCount;
      const state = layout.slotStatesIndex + data.firstSlot + index;
      if (Atomics.compareExchange(control, state, 0, 1) === 0) return index;
    }
    Atomics.wait(control, layout.releasesIndex, generation);
  }
}

function releaseSlot(control: Int32Array, layout: ReaderLayout, slot: number): void {
  Atomics.store(control, layout.slotStatesIndex + slot, 0);
  Atomics.add(control, layout.releasesIndex, 1);
}

main();
