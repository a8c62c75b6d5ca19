/**
 * FuseChannel: an open /dev/fuse with its reader threads (fuse-reader-worker.ts) and the shared slots the
 * requests land in. Requests go to `handler` on the main thread, where the BlockDevices live; the slot is
 * freed when the handler settles, so at most `slotCount` requests are in flight. Replies go out with one
 * write(2) each from the main thread (a FUSE reply must be a single write).
 *
 * Readers: `readerThreads` workers (default 2) all read the same descriptor — the kernel gives each
 * request to one blocked reader, and any thread may write its reply, so the main thread needs no idea
 * which reader took a request; the supervisor's hand-over of the descriptor is unchanged. Each reader
 * owns `slotCount / readerThreads` of the slots. On two cores the point is the direct reads below: one
 * reader serialises read(/dev/fuse) + pread + write(reply) of every origin read. Cloned descriptors
 * (FUSE_DEV_IOC_CLONE) would split the kernel's processing lists, but then a reply must go to the clone
 * its request came from; with this few readers the shared list is not what costs.
 *
 * Direct reads: openDirectRead(handle, fd) lets every reader serve READs on that file handle itself from
 * a description of `fd` of ours (fuse-reader-worker.ts); closeDirectRead(handle) takes it back. Both must
 * be called before the reply to the OPEN / RELEASE that they belong to is sent. The description is closed
 * once no reader can still pread it: at once when no reader was busy with a request as the close was
 * posted, otherwise when each busy one has acknowledged it or has ended (fuse-reader-protocol.ts).
 *
 * Lifecycle: open() → start(handler) → (mount elsewhere) → the workers end by themselves once the kernel
 * drops the connection (unmount or abort: read fails with ENODEV) → close() closes the descriptor. Errors
 * from the reply write that mean "nobody waits for this any more" (ENOENT: interrupted, ENODEV: connection
 * gone) are expected during shutdown and dropped.
 */
import * as fs from "node:fs";
import { MessageChannel, type MessagePort, Worker } from "node:worker_threads";
import { BlockError, toBlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { crashOnBrokenInvariant } from "../util/broken-invariant.js";
import type { Logger } from "../util/logger.js";
import * as abi from "./fuse-abi.js";
import {
  controlBytes,
  type DirectReadMessage,
  type FuseReaderMessage,
  type FuseReaderWorkerData,
  type ReaderLayout,
  readerControl,
  readerLayout,
} from "./fuse-reader-protocol.js";

export type FuseRequestHandler = (slot: Uint8Array, lengthBytes: number) => Promise<void>;

export interface FuseChannelOptions {
  readonly slotCount: number;
  readonly slotBytes: number;
  readonly logger: Logger;
  /** Threads reading /dev/fuse (1 to readerThreadsMax, at most slotCount); default 2. */
  readonly readerThreads?: number;
  /** Character device to open; tests of the channel itself may pass another. */
  readonly devicePath?: string;
}

export const defaultReaderThreads = 2;
export const readerThreadsMax = 8;

interface Reader {
  readonly index: number;
  readonly layout: ReaderLayout;
  readonly firstSlot: number;
  readonly slotCount: number;
  port: MessagePort | undefined;
  exited: boolean;
}

/** A description lent to the readers and withdrawn: closed once `owing` (reader indexes) is empty. */
interface WithdrawnFd {
  readonly fd: number;
  readonly owing: Set<number>;
}

export class FuseChannel {
  readonly fd: number;
  /** Resolves when every reader thread has exited (connection gone or worker failure). */
  readonly ended: Promise<void>;
  private readonly options: FuseChannelOptions;
  private readonly slots: SharedArrayBuffer;
  private readonly slotViews: Uint8Array[] = [];
  private readonly control: Int32Array;
  private readonly readers: Reader[] = [];
  /** The reader owning each slot. */
  private readonly slotOwners: Reader[] = [];
  private started = false;
  /** Descriptors lent to the readers: registered ones, and withdrawn ones not yet acknowledged by all. */
  private readonly directReadFds = new Map<bigint, number>();
  private readonly withdrawnFds = new Map<bigint, WithdrawnFd[]>();
  private resolveEnded: () => void = () => {};
  private closed = false;
  private readersRunning = 0;
  private requestsInFlight = 0;
  private isHandingOver = false;

  private constructor(fd: number, options: FuseChannelOptions) {
    const { slotCount } = options;
    const readerCount = options.readerThreads ?? defaultReaderThreads;
    assert(slotCount >= 1 && slotCount <= 4096, "slotCount");
    assert(
      Number.isSafeInteger(readerCount) &&
        readerCount >= 1 &&
        readerCount <= Math.min(readerThreadsMax, slotCount),
      `readerThreads ${readerCount}: 1 to ${readerThreadsMax}, at most slotCount`,
    );
    this.fd = fd;
    this.options = options;
    this.slots = new SharedArrayBuffer(slotCount * options.slotBytes);
    for (let index = 0; index < slotCount; index += 1) {
      this.slotViews.push(new Uint8Array(this.slots, index * options.slotBytes, options.slotBytes));
    }
    this.control = new Int32Array(new SharedArrayBuffer(controlBytes(readerCount, slotCount)));
    let firstSlot = 0;
    for (let index = 0; index < readerCount; index += 1) {
      // The first `slotCount % readerCount` readers take one slot more.
      const count = Math.floor(slotCount / readerCount) + (index < slotCount % readerCount ? 1 : 0);
      const reader: Reader = {
        index,
        layout: readerLayout(index, readerCount),
        firstSlot,
        slotCount: count,
        port: undefined,
        exited: false,
      };
      this.readers.push(reader);
      for (let slot = 0; slot < count; slot += 1) this.slotOwners.push(reader);
      firstSlot += count;
    }
    assert(firstSlot === slotCount, "slots partitioned between the readers");
    this.ended = new Promise<void>((resolve) => {
      this.resolveEnded = resolve;
    });
  }

  /** Reader threads of this channel. */
  get readerThreads(): number {
    return this.readers.length;
  }

  static open(options: FuseChannelOptions): FuseChannel {
    const path = options.devicePath ?? "/dev/fuse";
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_RDWR);
    } catch (error) {
      throw toBlockError(error, `Cannot open ${path}`);
    }
    return new FuseChannel(fd, options);
  }

  /**
   * Takes an open /dev/fuse descriptor inherited from another process (the supervisor keeps the
   * connection while engines come and go). The channel owns `fd` from now on: close() closes it.
   */
  static adopt(fd: number, options: FuseChannelOptions): FuseChannel {
    assert(Number.isSafeInteger(fd) && fd >= 0, "adopted /dev/fuse descriptor");
    return new FuseChannel(fd, options);
  }

  /**
   * FUSE_NOTIFY_RESEND (protocol 7.40, Linux 6.9): the kernel puts every request that was read from this
   * connection but not answered back in its queue, so a successor serves what a dead predecessor took.
   * False when the kernel does not know the notification.
   */
  notifyResend(): boolean {
    const message = new Uint8Array(16);
    const view = new DataView(message.buffer);
    view.setUint32(0, message.byteLength, true);
    view.setInt32(4, abi.FUSE_NOTIFY_RESEND, true);
    view.setBigUint64(8, 0n, true);
    try {
      fs.writeSync(this.fd, message);
      return true;
    } catch (error) {
      this.options.logger.warn(
        { err: error },
        "FUSE_NOTIFY_RESEND refused: requests a predecessor took are lost",
      );
      return false;
    }
  }

  start(handler: FuseRequestHandler): void {
    assert(!this.started && !this.closed, "FuseChannel started twice");
    this.started = true;
    this.readersRunning = this.readers.length;
    for (const reader of this.readers) this.startReader(reader, handler);
  }

  private startReader(reader: Reader, handler: FuseRequestHandler): void {
    const { port1, port2 } = new MessageChannel();
    const workerData: FuseReaderWorkerData = {
      fd: this.fd,
      slots: this.slots,
      slotBytes: this.options.slotBytes,
      firstSlot: reader.firstSlot,
      slotCount: reader.slotCount,
      control: this.control.buffer as SharedArrayBuffer,
      layout: reader.layout,
      directReads: port2,
      largeReadsInPlaceMax: this.readers.length - 1,
    };
    const worker = new Worker(new URL("./fuse-reader-worker.js", import.meta.url), {
      workerData,
      transferList: [port2],
    });
    reader.port = port1;
    // The port must not keep the process alive on its own.
    port1.unref();
    worker.on("message", (message: FuseReaderMessage) => this.onMessage(reader, message, handler));
    worker.on("error", (error) =>
      this.options.logger.error({ err: error, reader: reader.index }, "fuse reader thread failed"),
    );
    worker.on("exit", () => this.onReaderExit(reader));
  }

  /** Sends one complete reply. */
  send(reply: Uint8Array): void {
    // After close the number may already name another file: a late reply must go nowhere.
    if (this.closed) return;
    try {
      const written = fs.writeSync(this.fd, reply);
      assert(written === reply.byteLength, "short write of a FUSE reply");
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENODEV") return;
      this.options.logger.error({ err: error, code }, "cannot send a FUSE reply");
    }
  }

  /**
   * Lets the reader serve READs on `handle` from `fd` (a device's BlockDevice.directReadFd) over a device
   * of `sizeBytes`. The reader gets a descriptor of our own, opened here and now through /proc/self/fd,
   * so `fd` may be closed by its device at any time. False when that open fails (reads then stay here).
   */
  openDirectRead(handle: bigint, fd: number, sizeBytes: number): boolean {
    // A reader that ended would never see the registration; the others end soon (the connection is gone).
    if (!this.started || this.closed || this.readersRunning < this.readers.length) return false;
    let ownFd: number;
    try {
      ownFd = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDONLY);
    } catch (error) {
      this.options.logger.warn({ err: error }, "cannot reopen a device for direct reads; serving them here");
      return false;
    }
    assert(!this.directReadFds.has(handle), `direct-read handle ${handle} registered twice`);
    this.directReadFds.set(handle, ownFd);
    for (const reader of this.readers)
      this.postDirectRead(reader, { kind: "open", handle, fd: ownFd, sizeBytes });
    return true;
  }

  /**
   * Every reader stops serving `handle` before it looks at its next request; the descriptor is closed
   * once each reader still running has acknowledged that (or has ended).
   */
  closeDirectRead(handle: bigint): void {
    const fd = this.directReadFds.get(handle);
    if (fd === undefined) return;
    this.directReadFds.delete(handle);
    const owing = new Set<number>();
    for (const reader of this.readers) {
      if (reader.exited) continue;
      this.postDirectRead(reader, { kind: "close", handle });
      // Not busy after the post: it looks at its port before it serves anything again.
      if (Atomics.load(this.control, reader.layout.busyIndex) !== 0) owing.add(reader.index);
    }
    if (owing.size === 0) {
      fs.closeSync(fd);
      return;
    }
    const pending = this.withdrawnFds.get(handle);
    if (pending) pending.push({ fd, owing });
    else this.withdrawnFds.set(handle, [{ fd, owing }]);
  }

  /** Descriptors lent for direct reads and not yet closed (tests and diagnostics). */
  get directReadDescriptors(): number {
    let count = this.directReadFds.size;
    for (const pending of this.withdrawnFds.values()) count += pending.length;
    return count;
  }

  private postDirectRead(reader: Reader, message: DirectReadMessage): void {
    const port = reader.port;
    assert(port !== undefined, "direct read posted to a reader not started");
    port.postMessage(message);
    Atomics.add(this.control, reader.layout.directReadPostsIndex, 1);
  }

  /**
   * `reader` will not touch `handle`'s withdrawn descriptor again (it acknowledged, or it ended). An
   * acknowledgement nobody waits for (the reader was not busy at the close) changes nothing.
   */
  private settleWithdrawal(reader: Reader, handle: bigint): void {
    const pending = this.withdrawnFds.get(handle);
    // A reader acknowledges the closes of a handle in the order they were posted to it.
    const entry = pending?.find((withdrawn) => withdrawn.owing.has(reader.index));
    if (pending === undefined || entry === undefined) return;
    entry.owing.delete(reader.index);
    if (entry.owing.size > 0) return;
    fs.closeSync(entry.fd);
    pending.splice(pending.indexOf(entry), 1);
    if (pending.length === 0) this.withdrawnFds.delete(handle);
  }

  /**
   * A hand-over: requests the reader still posts are left unanswered (the successor gets them again
   * through FUSE_NOTIFY_RESEND), so nothing reaches a device after its state was handed over.
   */
  stopServing(): void {
    this.isHandingOver = true;
    this.stop();
  }

  /** Asks the readers to stop before their next read; they still need the kernel to end a read in progress. */
  stop(): void {
    Atomics.store(this.control, readerControl.stop, 1);
    for (const { layout } of this.readers) {
      Atomics.add(this.control, layout.releasesIndex, 1);
      Atomics.notify(this.control, layout.releasesIndex);
    }
  }

  /**
   * Closes the descriptor once every reader has exited (never before: the number could be reused by
   * another open and a reader would read from it). If this was its last user, the kernel aborts the
   * connection.
   */
  close(): void {
    if (this.closed) return;
    assert(this.readersRunning === 0, "FuseChannel closed while a reader still runs");
    this.closed = true;
    this.stop();
    for (const reader of this.readers) reader.port?.close();
    try {
      fs.closeSync(this.fd);
    } catch (error) {
      throw new BlockError("EIO", `Cannot close /dev/fuse: ${String(error)}`, { cause: error });
    }
  }

  /** Requests handed to the handler and not yet answered (a hand-over waits for 0). */
  get inFlight(): number {
    return this.requestsInFlight;
  }

  /** Large direct READs a reader is serving right now (tests and diagnostics). */
  get largeReadsInPlace(): number {
    return Atomics.load(this.control, readerControl.largeReadsInPlace);
  }

  /** Requests being served right now (tests and diagnostics). */
  get busySlots(): number {
    let busy = 0;
    const statesIndex = this.readers[0]!.layout.slotStatesIndex;
    for (let slot = 0; slot < this.options.slotCount; slot += 1) {
      if (Atomics.load(this.control, statesIndex + slot) !== 0) busy += 1;
    }
    return busy;
  }

  private onMessage(reader: Reader, message: FuseReaderMessage, handler: FuseRequestHandler): void {
    switch (message.kind) {
      case "request": {
        const view = this.slotViews[message.slot];
        assert(
          view && this.slotOwners[message.slot] === reader,
          `reader ${reader.index} posted slot ${message.slot}`,
        );
        if (this.isHandingOver) {
          // Unanswered on purpose: the kernel resends it to the successor (FUSE_NOTIFY_RESEND).
          Atomics.store(this.control, reader.layout.slotStatesIndex + message.slot, 0);
          return;
        }
        this.requestsInFlight += 1;
        handler(view, message.lengthBytes).then(
          () => this.release(message.slot),
          (error: unknown) => {
            this.release(message.slot);
            // Only broken invariants get here (FuseSession answers operating errors): the process ends.
            const thrown = error instanceof Error ? error : new Error(String(error));
            crashOnBrokenInvariant(thrown, this.options.logger, { slot: message.slot }, "the FUSE channel");
          },
        );
        return;
      }
      case "closed":
        this.options.logger.debug("fuse connection closed");
        return;
      case "failed":
        this.options.logger.error({ code: message.code }, `reading /dev/fuse failed: ${message.message}`);
        return;
      case "replyFailed":
        this.options.logger.error({ code: message.code }, `cannot send a FUSE reply: ${message.message}`);
        return;
      case "directReadClosed":
        this.settleWithdrawal(reader, message.handle);
        return;
    }
  }

  /**
   * An ended reader owes no acknowledgement; once every reader has ended, nobody uses the descriptors
   * they were lent.
   */
  private onReaderExit(reader: Reader): void {
    reader.exited = true;
    this.readersRunning -= 1;
    for (const [handle, pending] of [...this.withdrawnFds]) {
      const owed = pending.filter((withdrawn) => withdrawn.owing.has(reader.index)).length;
      for (let count = 0; count < owed; count += 1) this.settleWithdrawal(reader, handle);
    }
    if (this.readersRunning > 0) return;
    for (const fd of this.directReadFds.values()) fs.closeSync(fd);
    this.directReadFds.clear();
    assert(this.withdrawnFds.size === 0, "withdrawn direct-read descriptors left after every reader ended");
    this.resolveEnded();
  }

  private release(slot: number): void {
    this.requestsInFlight -= 1;
    const { layout } = this.slotOwners[slot]!;
    Atomics.store(this.control, layout.slotStatesIndex + slot, 0);
    Atomics.add(this.control, layout.releasesIndex, 1);
    Atomics.notify(this.control, layout.releasesIndex);
  }
}
