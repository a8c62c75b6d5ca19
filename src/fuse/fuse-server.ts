/**
 * FuseServer: the FUSE face of blocksnap. Every export of an ExportSource is a regular file in one flat
 * directory at `mountDir`; `losetup --direct-io=on` turns a file into a block device that can be
 * formatted, mounted and checked. It speaks the kernel protocol itself (FuseSession) over /dev/fuse
 * (FuseChannel: reader threads, requests served on the main thread), without libfuse.
 *
 * mount(): root only (EPERM otherwise); removes a stale mount at the directory first (cleanStaleMount),
 * refuses a directory a live blocksnap already serves (EBUSY), and resolves once the kernel's INIT is
 * answered. Exports appear and vanish live: lookups and listings always ask the source, and
 * onExportsChanged kills the files of vanished exports at once (their open handles answer EIO).
 *
 * Succession (the supervised engine, src/supervisor/): with `inheritedFd` the server uses a /dev/fuse
 * descriptor another process holds, and with `statePath` it keeps there what a successor needs
 * (fuse-session-state.ts). resume() is that successor: no mount and no INIT, the saved state instead, and
 * FUSE_NOTIFY_RESEND so that requests the predecessor read but never answered are served now. detach() is
 * a planned hand-over: stop reading, let the requests in flight finish, leave the mount and connection up.
 *
 * unmount(): idempotent. umount, lazily when busy; a lazily unmounted file system can outlive us (a loop
 * device still holds a file), so its connection is then aborted through fusectl: users of the files get
 * I/O errors instead of hanging on a server that is gone. The descriptor is closed after the reader ends.
 */
import { mkdir } from "node:fs/promises";
import { BlockError } from "../block/errors.js";
import type { ExportSource } from "../block/export-source.js";
import type { Logger } from "../util/logger.js";
import { silentLogger } from "../util/logger.js";
import { FuseChannel } from "./fuse-channel.js";
import {
  abortConnection,
  blocksnapMountsAt,
  canonicalMountDir,
  mountFuse,
  removeStaleMount,
  unmountFuse,
} from "./fuse-mount.js";
import { FuseSession } from "./fuse-session.js";
import { readFuseSessionState, writeFuseSessionState } from "./fuse-session-state.js";
import { clearPoison, poisonPathFor } from "./poison-request.js";

export interface FuseServerOptions {
  readonly mountDir: string;
  readonly logger?: Logger;
  /** An open /dev/fuse kept by another process (the supervisor); otherwise one is opened here. */
  readonly inheritedFd?: number;
  /** Where the session keeps what a successor process needs (fuse-session-state.ts). */
  readonly statePath?: string;
  /** Threads reading /dev/fuse (FuseChannel's readerThreads; default 2). */
  readonly readerThreads?: number;
}

/** Largest READ and WRITE: 256 pages, the kernel's default fs.fuse.max_pages_limit. */
const maxWriteBytes = 1024 * 1024;
/** Requests served at once (reader slots); also the kernel's max_background for async direct I/O. */
const slotCount = 64;
const initTimeoutMs = 10_000;
const readerEndTimeoutMs = 5_000;
const drainTimeoutMs = 10_000;
const drainPollMs = 5;

export class FuseServer {
  readonly mountDir: string;
  private readonly channel: FuseChannel;
  private readonly session: FuseSession;
  private readonly deviceNumber: number;
  private readonly logger: Logger;
  private readonly unsubscribe: () => void;
  private unmounting: Promise<void> | undefined;

  /** FUSE requests served by the main thread (READs the reader thread serves directly are not counted). */
  get requestStats(): { readonly handled: number; readonly failed: number } {
    return { handled: this.session.requestsHandled, failed: this.session.requestsFailed };
  }

  private constructor(
    mountDir: string,
    channel: FuseChannel,
    session: FuseSession,
    deviceNumber: number,
    source: ExportSource,
    logger: Logger,
  ) {
    this.mountDir = mountDir;
    this.channel = channel;
    this.session = session;
    this.deviceNumber = deviceNumber;
    this.logger = logger;
    this.unsubscribe = source.onExportsChanged(() => session.reconcile());
  }

  static async mount(source: ExportSource, options: FuseServerOptions): Promise<FuseServer> {
    const logger = options.logger ?? silentLogger;
    if ((process.getuid?.() ?? -1) !== 0) {
      throw new BlockError("EPERM", "Serving exports over FUSE needs root (mount -t fuse)");
    }
    try {
      await mkdir(options.mountDir, { recursive: true });
    } catch (error) {
      // A stale mount at the directory makes mkdir fail with ENOTCONN; cleanStaleMount handles it below.
      if ((error as NodeJS.ErrnoException).code !== "ENOTCONN") {
        throw new BlockError("EIO", `Cannot create ${options.mountDir}: ${String(error)}`, { cause: error });
      }
    }
    const mountDir = await canonicalMountDir(options.mountDir);
    await removeStaleMount(mountDir, logger);
    if ((await blocksnapMountsAt(mountDir)).length > 0) {
      throw new BlockError("EBUSY", `${mountDir} is already served by a running blocksnap`);
    }
    // A new connection numbers its requests afresh: a record of an earlier connection's request is void.
    if (options.statePath !== undefined) clearPoison(poisonPathFor(options.statePath));
    const { channel, session } = FuseServer.openSession(source, options, logger);
    channel.start((slot, lengthBytes) => session.handle(slot, lengthBytes));
    let deviceNumber: number | undefined;
    try {
      await mountFuse(channel.fd, mountDir);
      const mounts = await blocksnapMountsAt(mountDir);
      deviceNumber = mounts.at(-1)?.deviceNumber;
      if (deviceNumber === undefined) throw new BlockError("EIO", `mount at ${mountDir} is not in mountinfo`);
      await withTimeout(session.initialized, initTimeoutMs, `FUSE INIT at ${mountDir}`);
    } catch (error) {
      await FuseServer.abandon(channel, mountDir, deviceNumber, logger);
      throw error;
    }
    logger.info({ mountDir }, "fuse file system mounted");
    return new FuseServer(mountDir, channel, session, deviceNumber, source, logger);
  }

  /**
   * Serves the live mount at `options.mountDir` over `options.inheritedFd`, whose INIT a predecessor
   * process answered and whose state it left at `options.statePath`.
   */
  static async resume(
    source: ExportSource,
    options: FuseServerOptions & { readonly inheritedFd: number; readonly statePath: string },
  ): Promise<FuseServer> {
    const logger = options.logger ?? silentLogger;
    const mountDir = await canonicalMountDir(options.mountDir);
    const deviceNumber = (await blocksnapMountsAt(mountDir)).at(-1)?.deviceNumber;
    if (deviceNumber === undefined) {
      throw new BlockError("ENOENT", `no blocksnap FUSE mount at ${mountDir} to resume`);
    }
    const state = readFuseSessionState(options.statePath);
    const { channel, session } = FuseServer.openSession(source, options, logger);
    channel.start((slot, lengthBytes) => session.handle(slot, lengthBytes));
    session.resume(state);
    channel.notifyResend();
    logger.info({ mountDir }, "fuse file system resumed");
    return new FuseServer(mountDir, channel, session, deviceNumber, source, logger);
  }

  private static openSession(
    source: ExportSource,
    options: FuseServerOptions,
    logger: Logger,
  ): { channel: FuseChannel; session: FuseSession } {
    const channelOptions = {
      slotCount,
      slotBytes: FuseSession.slotBytesFor(maxWriteBytes),
      logger,
      ...(options.readerThreads === undefined ? {} : { readerThreads: options.readerThreads }),
    };
    const channel =
      options.inheritedFd === undefined
        ? FuseChannel.open(channelOptions)
        : FuseChannel.adopt(options.inheritedFd, channelOptions);
    const { statePath } = options;
    const session = new FuseSession({
      source,
      send: (reply) => channel.send(reply),
      logger,
      maxWriteBytes,
      backgroundRequestsMax: slotCount,
      directReads: {
        open: (handle, fd, sizeBytes) => channel.openDirectRead(handle, fd, sizeBytes),
        close: (handle) => channel.closeDirectRead(handle),
      },
      ...(statePath === undefined
        ? {}
        : {
            onStateChanged: (state) => writeFuseSessionState(statePath, state),
            poisonPath: poisonPathFor(statePath),
          }),
    });
    return { channel, session };
  }

  /**
   * A planned hand-over to a successor: serves no new request (one the reader still takes stays unanswered
   * and is resent to the successor), waits (bounded) for the ones in flight to be answered, and leaves
   * mount and connection to the process that keeps /dev/fuse open. After it resolves no FUSE write reaches
   * a device, so the CBT state saved next is exact.
   */
  async detach(): Promise<void> {
    this.unsubscribe();
    this.channel.stopServing();
    const deadline = Date.now() + drainTimeoutMs;
    let quietPolls = 0;
    while (quietPolls < 2 && Date.now() < deadline) {
      await new Promise((wake) => setTimeout(wake, drainPollMs));
      quietPolls = this.channel.inFlight === 0 ? quietPolls + 1 : 0;
    }
    if (quietPolls < 2)
      this.logger.warn({ busy: this.channel.busySlots }, "fuse requests still running at hand-over");
    this.logger.info({ mountDir: this.mountDir }, "fuse file system handed over");
  }

  /** Threads reading /dev/fuse (tests and diagnostics). */
  get readerThreads(): number {
    return this.channel.readerThreads;
  }

  /** Descriptors lent to the readers for direct reads and not yet closed (tests and diagnostics). */
  get directReadDescriptors(): number {
    return this.channel.directReadDescriptors;
  }

  /** Large direct READs a reader thread is serving right now (tests and diagnostics). */
  get largeReadsInPlace(): number {
    return this.channel.largeReadsInPlace;
  }

  /** Unmounts (lazily if busy), ends the connection and closes /dev/fuse. Idempotent. */
  unmount(): Promise<void> {
    this.unmounting ??= this.doUnmount();
    return this.unmounting;
  }

  private async doUnmount(): Promise<void> {
    this.unsubscribe();
    const result = await unmountFuse(this.mountDir, this.deviceNumber, this.logger);
    this.channel.stop();
    const endsAlone = result === "unmounted" || this.session.isDestroyed;
    if (!endsAlone || !(await settlesWithin(this.channel.ended, readerEndTimeoutMs))) {
      await abortConnection(this.deviceNumber, this.logger);
      if (!(await settlesWithin(this.channel.ended, readerEndTimeoutMs))) {
        // Closing now could hand the descriptor's number to another open while the reader still uses it.
        throw new BlockError(
          "EBUSY",
          `the fuse connection at ${this.mountDir} did not end; /dev/fuse stays open`,
        );
      }
    }
    this.channel.close();
    this.logger.info({ mountDir: this.mountDir, how: result }, "fuse file system unmounted");
  }

  /** Undoes a half-done mount(): whatever got mounted goes, the reader ends, the descriptor closes. */
  private static async abandon(
    channel: FuseChannel,
    mountDir: string,
    deviceNumber: number | undefined,
    logger: Logger,
  ): Promise<void> {
    channel.stop();
    if (deviceNumber !== undefined) {
      await unmountFuse(mountDir, deviceNumber, logger).catch(() => "gone");
      await abortConnection(deviceNumber, logger);
    }
    if (await settlesWithin(channel.ended, readerEndTimeoutMs)) channel.close();
    else logger.error({ mountDir }, "fuse reader did not end after a failed mount; /dev/fuse stays open");
  }
}

/**
 * Removes a blocksnap FUSE mount left at `mountDir` by a crashed server (every access fails with
 * "Transport endpoint is not connected"), lazily. True when one was removed.
 */
export function cleanStaleMount(mountDir: string): Promise<boolean> {
  return removeStaleMount(mountDir);
}

function settlesWithin(promise: Promise<void>, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    promise.then(
      () => {
        clearTimeout(timer);
        resolve(true);
      },
      () => {
        clearTimeout(timer);
        resolve(true);
      },
    );
  });
}

function withTimeout<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new BlockError("ETIMEDOUT", `${what} timed out`)), timeoutMs);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}
