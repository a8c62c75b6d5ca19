/**
 * FuseChannel: an open /dev/fuse with its reader thread (fuse-reader-worker.ts) and the shared slots the
 * requests land in. Requests go to `handler` on the main thread, where the BlockDevices live; the slot is
 * freed when the handler settles, so at most `slotCount` requests are in flight. Replies go out with one
 * write(2) each from the main thread (a FUSE reply must be a single write).
 *
 * Direct reads: openDirectRead(handle, fd) lets the reader thread serve READs on that file handle itself
 * from its own description of `fd` (fuse-reader-worker.ts); closeDirectRead(handle) takes it back. Both
 * must be called before the reply to the OPEN / RELEASE that they belong to is sent.
 *
 * Lifecycle: open() → start(handler) → (mount elsewhere) → the worker ends by itself once the kernel drops
 * the connection (unmount or abort: read fails with ENODEV) → close() closes the descriptor. Errors from
 * the reply write that mean "nobody waits for this any more" (ENOENT: interrupted, ENODEV: connection
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
  readerControl,
} from "./fuse-reader-protocol.js";

export type FuseRequestHandler = (slot: Uint8Array, lengthBytes: number) => Promise<void>;

export interface FuseChannelOptions {
  readonly slotCount: number;
  readonly slotBytes: number;
  readonly logger: Logger;
  /** Character device to open; tests of the channel itself may pass another. */
  readonly devicePath?: string;
}

export class FuseChannel {
  readonly fd: number;
  /** Resolves when the reader thread has exited (connection gone or worker failure). */
  readonly ended: Promise<void>;
  private readonly options: FuseChannelOptions;
  private readonly slots: SharedArrayBuffer;
  private readonly slotViews: Uint8Array[] = [];
  private readonly control: Int32Array;
  private worker: Worker | undefined;
  private directReadPort: MessagePort | undefined;
  /** Descriptors lent to the reader: registered ones, and withdrawn ones it has not yet acknowledged. */
  private readonly directReadFds = new Map<bigint, number>();
  private readonly withdrawnFds = new Map<bigint, number>();
  private resolveEnded: () => void = () => {};
  private closed = false;
  private workerExited = false;
  private requestsInFlight = 0;
  private isHandingOver = false;

  private constructor(fd: number, options: FuseChannelOptions) {
    assert(options.slotCount >= 1 && options.slotCount <= 4096, "slotCount");
    this.fd = fd;
    this.options = options;
    this.slots = new SharedArrayBuffer(options.slotCount * options.slotBytes);
    for (let index = 0; index < options.slotCount; index += 1) {
      this.slotViews.push(new Uint8Array(this.slots, index * options.slotBytes, options.slotBytes));
    }
    this.control = new Int32Array(new SharedArrayBuffer(controlBytes(options.slotCount)));
    this.ended = new Promise<void>((resolve) => {
      this.resolveEnded = resolve;
    });
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
    assert(!this.worker && !this.closed, "FuseChannel started twice");
    const { port1, port2 } = new MessageChannel();
    const workerData: FuseReaderWorkerData = {
      fd: this.fd,
      slots: this.slots,
      slotCount: this.options.slotCount,
      slotBytes: this.options.slotBytes,
      control: this.control.buffer as SharedArrayBuffer,
      directReads: port2,
    };
    const worker = new Worker(new URL("./fuse-reader-worker.js", import.meta.url), {
      workerData,
      transferList: [port2],
    });
    this.worker = worker;
    this.directReadPort = port1;
    // The port must not keep the process alive on its own.
    port1.unref();
    worker.on("message", (message: FuseReaderMessage) => this.onMessage(message, handler));
    worker.on("error", (error) => this.options.logger.error({ err: error }, "fuse reader thread failed"));
    worker.on("exit", () => {
      this.workerExited = true;
      this.closeLentDescriptors();
      this.resolveEnded();
    });
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
    const port = this.directReadPort;
    if (!port || this.workerExited || this.closed) return false;
    let ownFd: number;
    try {
      ownFd = fs.openSync(`/proc/self/fd/${fd}`, fs.constants.O_RDONLY);
    } catch (error) {
      this.options.logger.warn({ err: error }, "cannot reopen a device for direct reads; serving them here");
      return false;
    }
    this.directReadFds.set(handle, ownFd);
    this.postDirectRead(port, { kind: "open", handle, fd: ownFd, sizeBytes });
    return true;
  }

  /**
   * The reader stops serving `handle` before it looks at its next request; its descriptor is closed once
   * the reader has acknowledged that.
   */
  closeDirectRead(handle: bigint): void {
    const fd = this.directReadFds.get(handle);
    const port = this.directReadPort;
    if (fd === undefined || !port) return;
    this.directReadFds.delete(handle);
    this.withdrawnFds.set(handle, fd);
    this.postDirectRead(port, { kind: "close", handle });
  }

  private postDirectRead(port: MessagePort, message: DirectReadMessage): void {
    port.postMessage(message);
    Atomics.add(this.control, readerControl.directReadPosts, 1);
  }

  /**
   * A hand-over: requests the reader still posts are left unanswered (the successor gets them again
   * through FUSE_NOTIFY_RESEND), so nothing reaches a device after its state was handed over.
   */
  stopServing(): void {
    this.isHandingOver = true;
    this.stop();
  }

  /** Asks the reader to stop before its next read; it still needs the kernel to end a read in progress. */
  stop(): void {
    Atomics.store(this.control, readerControl.stop, 1);
    Atomics.add(this.control, readerControl.releases, 1);
    Atomics.notify(this.control, readerControl.releases);
  }

  /**
   * Closes the descriptor once the reader has exited (never before: the number could be reused by another
   * open and the reader would read from it). If this was its last user, the kernel aborts the connection.
   */
  close(): void {
    if (this.closed) return;
    assert(!this.worker || this.workerExited, "FuseChannel closed while its reader still runs");
    this.closed = true;
    this.stop();
    this.directReadPort?.close();
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

  /** Requests being served right now (tests and diagnostics). */
  get busySlots(): number {
    let busy = 0;
    for (let slot = 0; slot < this.options.slotCount; slot += 1) {
      if (Atomics.load(this.control, readerControl.firstSlot + slot) !== 0) busy += 1;
    }
    return busy;
  }

  private onMessage(message: FuseReaderMessage, handler: FuseRequestHandler): void {
    switch (message.kind) {
      case "request": {
        const view = this.slotViews[message.slot];
        assert(view, `reader posted slot ${message.slot}`);
        if (this.isHandingOver) {
          // Unanswered on purpose: the kernel resends it to the successor (FUSE_NOTIFY_RESEND).
          Atomics.store(this.control, readerControl.firstSlot + message.slot, 0);
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
      case "directReadClosed": {
        const fd = this.withdrawnFds.get(message.handle);
        this.withdrawnFds.delete(message.handle);
        if (fd !== undefined) fs.closeSync(fd);
        return;
      }
    }
  }

  /** Once the reader has ended, nobody else uses the descriptors it was lent. */
  private closeLentDescriptors(): void {
    for (const fd of [...this.directReadFds.values(), ...this.withdrawnFds.values()]) fs.closeSync(fd);
    this.directReadFds.clear();
    this.withdrawnFds.clear();
  }

  private release(slot: number): void {
    this.requestsInFlight -= 1;
    Atomics.store(this.control, readerControl.firstSlot + slot, 0);
    Atomics.add(this.control, readerControl.releases, 1);
    Atomics.notify(this.control, readerControl.releases);
  }
}
