/**
 * FuseSession: the FUSE protocol state machine, independent of /dev/fuse. It takes one request at a time
 * in a buffer (a reader slot), runs it against the ExportSource and sends exactly one reply (or none, for
 * FORGET, BATCH_FORGET and INTERRUPT) through `send`. Requests run concurrently: `handle` may be called
 * again before earlier calls settle; the kernel orders nothing between them and neither do we.
 *
 * The file system is one flat directory: node 1 is the root, every export is a regular file of the
 * device's size (mode 0600, 0400 when read-only). Files are opened with FOPEN_DIRECT_IO so that no page
 * cache sits between FUSE clients and the device: what a loop device over the file reads is what NBD
 * clients read. Entry and attribute timeouts are zero, so every path walk asks us and a vanished export
 * is gone for the next lookup at once; its open handles answer EIO (InodeTable).
 *
 * Direct reads: when an opened export's device offers BlockDevice.directReadFd (an origin over a plain
 * file) and the session was given `directReads`, the handle is registered there before the OPEN is
 * answered, so the reader thread serves its READs without coming here; the registration is withdrawn
 * before the RELEASE is answered and as soon as the export vanishes (reconcile).
 *
 * Replies are built in the request's own slot, after every field of the request has been read: READ data
 * lands right behind the reply header, so a read costs no allocation and one write(2). The slot must hold
 * FUSE_OUT_HEADER_BYTES + the largest read we negotiate (maxWriteBytes).
 *
 * Succession (fuse-session-state.ts): with `onStateChanged`, every change of the numbers the kernel holds
 * (a new node, an opened or released handle) is handed over synchronously before the reply that reveals
 * it; resume() takes such a state instead of an INIT, in a process that adopted a live connection.
 *
 * Not done: READDIRPLUS, locks, xattrs, ioctls, lseek (ENOSYS; the kernel falls back); discard (fallocate
 * PUNCH_HOLE, see fallocate()). INTERRUPT is ignored
 * because every request finishes in bounded time on its own. The device size is fixed: size changes are
 * refused with EPERM, like chmod and chown; time changes are accepted and forgotten.
 */
import { constants } from "node:os";
import type { BlockDevice } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import type { ExportSource } from "../block/export-source.js";
import { assert } from "../util/assert.js";
import { crashOnBrokenInvariant, isBrokenInvariant } from "../util/broken-invariant.js";
import type { Logger } from "../util/logger.js";
import { FUSE_ERROR_NOT_IMPLEMENTED, fuseErrorOf } from "./errno-map.js";
import * as abi from "./fuse-abi.js";
import type { FuseSessionState } from "./fuse-session-state.js";
import { type FileNode, InodeTable } from "./inode-table.js";
import {
  clearPoison,
  originalUnique,
  type PoisonRecord,
  poisonCrashesMax,
  readPoison,
  writeAssertHook,
  writePoison,
} from "./poison-request.js";

export interface FuseSessionOptions {
  readonly source: ExportSource;
  /** Writes one complete reply to the kernel (one write(2)); the buffer may be reused afterwards. */
  readonly send: (reply: Uint8Array) => void;
  readonly logger: Logger;
  /** Largest WRITE payload and READ size we accept; the slots must hold it plus headers. */
  readonly maxWriteBytes: number;
  /** Requests the kernel may keep in flight in the background (async direct I/O from loop devices). */
  readonly backgroundRequestsMax: number;
  /** Open file and directory handles at once; beyond it OPEN fails with ENOMEM. */
  readonly handlesMax?: number;
  /** Where READs of a handle may be served without the session (FuseChannel's reader thread). */
  readonly directReads?: DirectReadRegistry;
  /** Called synchronously, before the reply, whenever the state a successor needs changes. */
  readonly onStateChanged?: (state: FuseSessionState) => void;
  /**
   * Supervised engines: where the request in hand at a broken invariant is recorded instead of answered
   * (poison-request.ts); the session reads it at start.
   */
  readonly poisonPath?: string;
}

export interface DirectReadRegistry {
  /** True when READs on `handle` will from now on be served from `fd` elsewhere. */
  open(handle: bigint, fd: number, sizeBytes: number): boolean;
  close(handle: bigint): void;
}

interface Request {
  readonly slot: Uint8Array;
  readonly view: DataView;
  readonly lengthBytes: number;
  readonly opcode: number;
  readonly unique: bigint;
  readonly nodeId: bigint;
}

interface DirectoryEntry {
  readonly name: string;
  readonly nodeId: number;
  readonly type: number;
}

const pageBytes = 4096;
const statfsBlockBytes = 4096;
const nameLengthMax = 255;
const defaultHandlesMax = 65536;
/** Zeroing (discard from a loop device) proceeds in steps so that other requests are served meanwhile. */
const zeroStepBytes = 64 * 1024 * 1024;
const O_ACCMODE = 3;
const O_RDONLY = 0;
const X_OK = 1;
const textDecoder = new TextDecoder("utf-8", { fatal: false });
const textEncoder = new TextEncoder();

export class FuseSession {
  readonly table: InodeTable;
  /** Resolves when INIT has been answered; rejects when the kernel's protocol is unusable. */
  readonly initialized: Promise<void>;
  private readonly options: FuseSessionOptions;
  /** Requests served here (not the direct READs of the reader thread), and those answered with an error. */
  requestsHandled = 0;
  requestsFailed = 0;
  private readonly handlesMax: number;
  private readonly fileHandles = new Map<bigint, FileNode>();
  /** File handles registered with options.directReads. */
  private readonly directHandles = new Set<bigint>();
  private readonly directoryHandles = new Map<bigint, DirectoryEntry[]>();
  private nextHandle = 1n;
  private negotiatedMinor = 0;
  /** Handles below this were numbered by a predecessor process (resume()). */
  private predecessorHandlesBelow = 0n;
  /** The table's next node id when the state was last handed over: a new node changes it. */
  private handedOverNextNodeId = 0;
  private destroyed = false;
  private readonly startSeconds = BigInt(Math.floor(Date.now() / 1000));
  private readonly uid = process.getuid?.() ?? 0;
  private readonly gid = process.getgid?.() ?? 0;
  private resolveInitialized: () => void = () => {};
  private rejectInitialized: (error: Error) => void = () => {};
  /** The request that was in hand when a predecessor broke an invariant. */
  private poison: PoisonRecord | null;

  constructor(options: FuseSessionOptions) {
    assert(options.maxWriteBytes >= pageBytes && options.maxWriteBytes % pageBytes === 0, "maxWriteBytes");
    assert(options.backgroundRequestsMax >= 1 && options.backgroundRequestsMax <= 0xffff, "background");
    this.options = options;
    this.handlesMax = options.handlesMax ?? defaultHandlesMax;
    this.table = new InodeTable(options.source);
    this.poison = options.poisonPath === undefined ? null : readPoison(options.poisonPath);
    this.initialized = new Promise<void>((resolve, reject) => {
      this.resolveInitialized = resolve;
      this.rejectInitialized = reject;
    });
    // A mount that never completes INIT must not leave an unhandled rejection behind.
    this.initialized.catch(() => {});
  }

  /** The slot size a reader must provide: the largest request (a full WRITE) or reply (a full READ). */
  static slotBytesFor(maxWriteBytes: number): number {
    return Math.max(
      abi.FUSE_MIN_READ_BUFFER,
      abi.FUSE_IN_HEADER_BYTES + abi.FUSE_WRITE_IN_BYTES + maxWriteBytes + pageBytes,
    );
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  /** Exports changed: vanished files die now, so their open handles fail at once. */
  reconcile(): void {
    this.table.reconcile();
    for (const handle of this.directHandles) {
      if (this.fileHandles.get(handle)?.alive !== true) this.closeDirectRead(handle);
    }
  }

  /** What a successor process needs to go on serving this connection (fuse-session-state.ts). */
  exportState(): FuseSessionState {
    const table = this.table.exportState();
    return {
      negotiatedMinor: this.negotiatedMinor,
      maxWriteBytes: this.options.maxWriteBytes,
      nextNodeId: table.nextNodeId,
      nodes: table.nodes,
      nextHandle: this.nextHandle.toString(),
      handles: [...this.fileHandles].map(([handle, node]) => ({
        handle: handle.toString(),
        nodeId: node.nodeId,
      })),
    };
  }

  /**
   * Goes on serving a connection whose INIT a predecessor answered: its node ids and file handles stay
   * valid (handles of exports that vanished meanwhile answer EIO). Before the first request only, and after
   * the reader has started (direct reads are registered again).
   */
  resume(state: FuseSessionState): void {
    assert(this.negotiatedMinor === 0 && this.fileHandles.size === 0, "resume of a used FuseSession");
    if (state.maxWriteBytes !== this.options.maxWriteBytes) {
      throw new BlockError(
        "EINVAL",
        `the FUSE connection was set up for ${state.maxWriteBytes}-byte writes, this server uses ${this.options.maxWriteBytes}`,
      );
    }
    if (state.negotiatedMinor < abi.FUSE_KERNEL_MINOR_MIN) {
      throw new BlockError("EINVAL", `the FUSE connection's protocol 7.${state.negotiatedMinor} is unusable`);
    }
    this.table.restore(state);
    let nextHandle = BigInt(state.nextHandle);
    for (const saved of state.handles) {
      const handle = BigInt(saved.handle);
      if (handle >= nextHandle) nextHandle = handle + 1n;
      const node = this.table.node(saved.nodeId);
      if (!node) continue;
      this.fileHandles.set(handle, node);
      this.table.opened(node);
      this.registerDirectRead(handle, node);
    }
    this.nextHandle = nextHandle;
    this.predecessorHandlesBelow = nextHandle;
    this.negotiatedMinor = state.negotiatedMinor;
    this.handedOverNextNodeId = this.table.nextNodeId;
    this.options.logger.info(
      { negotiated: `7.${state.negotiatedMinor}`, nodes: state.nodes.length, handles: this.fileHandles.size },
      "fuse session resumed",
    );
    this.resolveInitialized();
  }

  /**
   * Serves one request read from /dev/fuse into `slot[0, lengthBytes)`. A broken invariant below ends the
   * daemon (util/broken-invariant.ts): the request is answered EIO, or, with a poisonPath (supervised),
   * left for the next engine (poison-request.ts); a malformed slot rejects (the channel then crashes).
   */
  async handle(slot: Uint8Array, lengthBytes: number): Promise<void> {
    this.requestsHandled += 1;
    assert(lengthBytes >= abi.FUSE_IN_HEADER_BYTES, `short FUSE request: ${lengthBytes} bytes`);
    assert(slot.byteLength >= FuseSession.slotBytesFor(pageBytes), "reader slot too small");
    const view = new DataView(slot.buffer, slot.byteOffset, slot.byteLength);
    assert(view.getUint32(0, true) === lengthBytes, "FUSE request length does not match the read");
    const request: Request = {
      slot,
      view,
      lengthBytes,
      opcode: view.getUint32(4, true),
      unique: view.getBigUint64(8, true),
      nodeId: view.getBigUint64(16, true),
    };
    const poisoned = this.poisonOf(request);
    if (poisoned !== null && poisoned.crashes >= poisonCrashesMax) {
      this.options.logger.error(
        { opcode: request.opcode, unique: poisoned.unique, crashes: poisoned.crashes },
        "a FUSE request broke an invariant in every engine that ran it: answered EIO without running it",
      );
      this.answeredPoison();
      this.replyError(request, -constants.errno.EIO);
      return;
    }
    try {
      await this.dispatch(request);
    } catch (error) {
      if (isBrokenInvariant(error)) {
        const { poisonPath } = this.options;
        if (poisonPath !== undefined) {
          // Unanswered: the kernel resends it to the next engine (see poison-request.ts).
          const unique = originalUnique(request.unique).toString();
          writePoison(poisonPath, { unique, opcode: request.opcode, crashes: (poisoned?.crashes ?? 0) + 1 });
          crashOnBrokenInvariant(
            error,
            this.options.logger,
            { opcode: request.opcode, unique },
            "a FUSE request",
            "left unanswered for the next engine",
          );
          return;
        }
        crashOnBrokenInvariant(error, this.options.logger, { opcode: request.opcode }, "a FUSE request");
        this.replyError(request, -constants.errno.EIO);
        return;
      }
      const fuseError = fuseErrorOf(error);
      this.requestsFailed += 1;
      this.options.logger.debug(
        { opcode: request.opcode, error: fuseError, detail: String(error) },
        "fuse request failed",
      );
      this.replyError(request, fuseError);
    }
    if (poisoned !== null) this.answeredPoison();
  }

  /** The record of a predecessor's crash, when `request` is the one it was serving. */
  private poisonOf(request: Request): PoisonRecord | null {
    const poison = this.poison;
    if (poison === null || poison.unique !== originalUnique(request.unique).toString()) return null;
    return poison;
  }

  private answeredPoison(): void {
    this.poison = null;
    if (this.options.poisonPath !== undefined) clearPoison(this.options.poisonPath);
  }

  private async dispatch(request: Request): Promise<void> {
    if (request.opcode === abi.FUSE_INIT) return this.init(request);
    if (this.negotiatedMinor === 0) throw new BlockError("EIO", "FUSE request before INIT");
    switch (request.opcode) {
      case abi.FUSE_LOOKUP:
        return this.lookup(request);
      case abi.FUSE_FORGET:
        this.table.forget(this.nodeNumber(request.nodeId), Number(request.view.getBigUint64(40, true)));
        return;
      case abi.FUSE_BATCH_FORGET:
        return this.batchForget(request);
      case abi.FUSE_GETATTR:
        return this.getattr(request);
      case abi.FUSE_SETATTR:
        return this.setattr(request);
      case abi.FUSE_OPEN:
        return this.open(request);
      case abi.FUSE_READ:
        return this.read(request);
      case abi.FUSE_WRITE:
        return this.write(request);
      case abi.FUSE_FLUSH:
        this.liveHandle(request.view.getBigUint64(40, true));
        return this.replyOk(request, 0);
      case abi.FUSE_FSYNC:
        return this.fsync(request);
      case abi.FUSE_RELEASE:
        return this.release(request);
      case abi.FUSE_FALLOCATE:
        return this.fallocate(request);
      case abi.FUSE_OPENDIR:
        return this.opendir(request);
      case abi.FUSE_READDIR:
        return this.readdir(request);
      case abi.FUSE_RELEASEDIR:
        this.directoryHandles.delete(request.view.getBigUint64(40, true));
        return this.replyOk(request, 0);
      case abi.FUSE_FSYNCDIR:
        return this.replyOk(request, 0);
      case abi.FUSE_STATFS:
        return this.statfs(request);
      case abi.FUSE_ACCESS:
        return this.access(request);
      case abi.FUSE_INTERRUPT:
        return;
      case abi.FUSE_DESTROY:
        this.destroyed = true;
        return this.replyOk(request, 0);
      default:
        this.replyError(request, FUSE_ERROR_NOT_IMPLEMENTED);
    }
  }

  private init(request: Request): void {
    const { view } = request;
    const major = view.getUint32(40, true);
    const minor = view.getUint32(44, true);
    const maxReadaheadBytes = view.getUint32(48, true);
    const kernelFlags = view.getUint32(52, true);
    if (
      major < abi.FUSE_KERNEL_VERSION ||
      (major === abi.FUSE_KERNEL_VERSION && minor < abi.FUSE_KERNEL_MINOR_MIN)
    ) {
      this.replyError(request, -constants.errno.EPROTO);
      this.rejectInitialized(
        new BlockError(
          "EIO",
          `the kernel speaks FUSE ${major}.${minor}; blocksnap needs 7.${abi.FUSE_KERNEL_MINOR_MIN}`,
        ),
      );
      return;
    }
    // A newer major: answer with ours and wait for the kernel's next INIT (include/uapi/linux/fuse.h).
    const negotiatedMinor =
      major > abi.FUSE_KERNEL_VERSION
        ? abi.FUSE_KERNEL_MINOR_IMPLEMENTED
        : Math.min(minor, abi.FUSE_KERNEL_MINOR_IMPLEMENTED);
    const wantedFlags =
      abi.FUSE_ASYNC_READ |
      abi.FUSE_BIG_WRITES |
      abi.FUSE_ASYNC_DIO |
      abi.FUSE_PARALLEL_DIROPS |
      abi.FUSE_MAX_PAGES;
    const flags = (kernelFlags & wantedFlags) >>> 0;
    const background = this.options.backgroundRequestsMax;
    request.slot.fill(0, abi.FUSE_OUT_HEADER_BYTES, abi.FUSE_OUT_HEADER_BYTES + abi.FUSE_INIT_OUT_BYTES);
    const at = abi.FUSE_OUT_HEADER_BYTES;
    view.setUint32(at + 0, abi.FUSE_KERNEL_VERSION, true);
    view.setUint32(at + 4, negotiatedMinor, true);
    view.setUint32(at + 8, maxReadaheadBytes, true);
    view.setUint32(at + 12, flags, true);
    view.setUint16(at + 16, background, true);
    view.setUint16(at + 18, Math.max(1, Math.floor((background * 3) / 4)), true);
    view.setUint32(at + 20, this.options.maxWriteBytes, true);
    view.setUint32(at + 24, 1, true);
    view.setUint16(at + 28, this.options.maxWriteBytes / pageBytes, true);
    this.replyOk(request, abi.FUSE_INIT_OUT_BYTES);
    if (major > abi.FUSE_KERNEL_VERSION) return;
    this.negotiatedMinor = negotiatedMinor;
    this.handOver();
    this.options.logger.info(
      {
        kernel: `${major}.${minor}`,
        negotiated: `7.${negotiatedMinor}`,
        flags,
        maxWriteBytes: this.options.maxWriteBytes,
      },
      "fuse session initialized",
    );
    this.resolveInitialized();
  }

  private lookup(request: Request): void {
    if (request.nodeId !== abi.FUSE_ROOT_ID) throw new BlockError("ENOTDIR", "lookup in a regular file");
    const name = this.nameOf(request);
    const node = this.table.find(name);
    if (!node) throw new BlockError("ENOENT", `no export ${JSON.stringify(name)}`);
    this.table.lookedUp(node);
    this.handOverNewNodes();
    const { view } = request;
    const at = abi.FUSE_OUT_HEADER_BYTES;
    view.setBigUint64(at + 0, BigInt(node.nodeId), true);
    view.setBigUint64(at + 8, 0n, true);
    view.setBigUint64(at + 16, 0n, true);
    view.setBigUint64(at + 24, 0n, true);
    view.setUint32(at + 32, 0, true);
    view.setUint32(at + 36, 0, true);
    this.writeFileAttr(view, at + 40, node);
    this.replyOk(request, abi.FUSE_ENTRY_OUT_BYTES);
  }

  private batchForget(request: Request): void {
    const { view } = request;
    const count = view.getUint32(40, true);
    const first = abi.FUSE_IN_HEADER_BYTES + 8;
    assert(
      first + count * abi.FUSE_FORGET_ONE_BYTES <= request.lengthBytes,
      "BATCH_FORGET overruns its request",
    );
    for (let index = 0; index < count; index += 1) {
      const at = first + index * abi.FUSE_FORGET_ONE_BYTES;
      this.table.forget(
        this.nodeNumber(view.getBigUint64(at, true)),
        Number(view.getBigUint64(at + 8, true)),
      );
    }
  }

  private getattr(request: Request): void {
    const byHandle = (request.view.getUint32(40, true) & abi.FUSE_GETATTR_FH) !== 0;
    const attrAt = abi.FUSE_OUT_HEADER_BYTES + 16;
    if (request.nodeId === abi.FUSE_ROOT_ID) {
      this.writeRootAttr(request.view, attrAt);
    } else {
      const node = this.table.node(this.nodeNumber(request.nodeId));
      if (!node) throw new BlockError("ENOENT", "getattr of an unknown node");
      if (!node.alive) {
        throw new BlockError(byHandle ? "EIO" : "ENOENT", `export ${JSON.stringify(node.name)} is gone`);
      }
      this.writeFileAttr(request.view, attrAt, node);
    }
    this.writeAttrOutHeader(request.view);
    this.replyOk(request, abi.FUSE_ATTR_OUT_BYTES);
  }

  private setattr(request: Request): void {
    const { view } = request;
    const at = abi.FUSE_IN_HEADER_BYTES;
    const valid = view.getUint32(at, true);
    const sizeBytes = view.getBigUint64(at + 16, true);
    const mode = view.getUint32(at + 68, true);
    const uid = view.getUint32(at + 76, true);
    const gid = view.getUint32(at + 80, true);
    const isRoot = request.nodeId === abi.FUSE_ROOT_ID;
    const node = isRoot ? undefined : this.table.node(this.nodeNumber(request.nodeId));
    if (!isRoot && !node?.alive) throw new BlockError("ENOENT", "setattr of a vanished export");
    const currentMode = node ? fileMode(node) : abi.S_IFDIR | 0o755;
    if ((valid & abi.FATTR_SIZE) !== 0 && (isRoot || sizeBytes !== BigInt(node!.entry.device.sizeBytes))) {
      throw new BlockError("EPERM", "the size of an export is fixed");
    }
    if ((valid & abi.FATTR_MODE) !== 0 && (mode & 0o7777) !== (currentMode & 0o7777)) {
      throw new BlockError("EPERM", "export modes are fixed");
    }
    if (
      ((valid & abi.FATTR_UID) !== 0 && uid !== this.uid) ||
      ((valid & abi.FATTR_GID) !== 0 && gid !== this.gid)
    ) {
      throw new BlockError("EPERM", "export owners are fixed");
    }
    const attrAt = abi.FUSE_OUT_HEADER_BYTES + 16;
    if (node) this.writeFileAttr(view, attrAt, node);
    else this.writeRootAttr(view, attrAt);
    this.writeAttrOutHeader(view);
    this.replyOk(request, abi.FUSE_ATTR_OUT_BYTES);
  }

  private open(request: Request): void {
    const openFlags = request.view.getUint32(40, true);
    const node = this.table.node(this.nodeNumber(request.nodeId));
    if (!node?.alive) throw new BlockError("ENOENT", "open of a vanished export");
    if (node.entry.readOnly && (openFlags & O_ACCMODE) !== O_RDONLY) {
      throw new BlockError("EACCES", `export ${JSON.stringify(node.name)} is read-only`);
    }
    const handle = this.allocateHandle();
    this.fileHandles.set(handle, node);
    this.table.opened(node);
    this.registerDirectRead(handle, node);
    this.handOver();
    this.writeOpenOut(request.view, handle, abi.FOPEN_DIRECT_IO | abi.FOPEN_PARALLEL_DIRECT_WRITES);
    this.replyOk(request, abi.FUSE_OPEN_OUT_BYTES);
  }

  private async read(request: Request): Promise<void> {
    const { view, slot } = request;
    const at = abi.FUSE_IN_HEADER_BYTES;
    const node = this.liveHandle(view.getBigUint64(at, true));
    const offset = view.getBigUint64(at + 8, true);
    const lengthBytes = view.getUint32(at + 16, true);
    const device = node.entry.device;
    const sizeBytes = BigInt(device.sizeBytes);
    if (offset >= sizeBytes || lengthBytes === 0) return this.replyOk(request, 0);
    const offsetBytes = Number(offset);
    const readBytes = Math.min(lengthBytes, device.sizeBytes - offsetBytes);
    if (abi.FUSE_OUT_HEADER_BYTES + readBytes > slot.byteLength) {
      throw new BlockError("EINVAL", `read of ${readBytes} bytes exceeds the negotiated maximum`);
    }
    const start = abi.FUSE_OUT_HEADER_BYTES;
    await device.read(offsetBytes, slot.subarray(start, start + readBytes));
    this.replyOk(request, readBytes);
  }

  private async write(request: Request): Promise<void> {
    writeAssertHook();
    const { view, slot } = request;
    const at = abi.FUSE_IN_HEADER_BYTES;
    const node = this.liveHandle(view.getBigUint64(at, true));
    const offset = view.getBigUint64(at + 8, true);
    const lengthBytes = view.getUint32(at + 16, true);
    const dataAt = at + abi.FUSE_WRITE_IN_BYTES;
    if (dataAt + lengthBytes !== request.lengthBytes) {
      throw new BlockError("EINVAL", "WRITE payload does not match its request length");
    }
    const device = node.entry.device;
    if (lengthBytes > 0) {
      if (offset >= BigInt(device.sizeBytes)) {
        throw new BlockError("ENOSPC", `write at ${offset} is past the end of ${device.sizeBytes} bytes`);
      }
      // Like a block device: a write straddling the end writes what fits and reports a short count.
      const offsetBytes = Number(offset);
      const writeBytes = Math.min(lengthBytes, device.sizeBytes - offsetBytes);
      await device.write(offsetBytes, slot.subarray(dataAt, dataAt + writeBytes));
      view.setUint32(abi.FUSE_OUT_HEADER_BYTES, writeBytes, true);
    } else {
      view.setUint32(abi.FUSE_OUT_HEADER_BYTES, 0, true);
    }
    view.setUint32(abi.FUSE_OUT_HEADER_BYTES + 4, 0, true);
    this.replyOk(request, abi.FUSE_WRITE_OUT_BYTES);
  }

  private async fsync(request: Request): Promise<void> {
    const node = this.liveHandle(request.view.getBigUint64(abi.FUSE_IN_HEADER_BYTES, true));
    await node.entry.device.flush();
    this.replyOk(request, 0);
  }

  private release(request: Request): void {
    const handle = request.view.getBigUint64(abi.FUSE_IN_HEADER_BYTES, true);
    const node = this.fileHandles.get(handle);
    if (node) {
      this.closeDirectRead(handle);
      this.fileHandles.delete(handle);
      this.table.released(node);
      this.handOver();
    }
    this.replyOk(request, 0);
  }

  /**
   * fallocate(2) on an export file; loop devices send their discards (PUNCH_HOLE) and write-zeroes
   * (ZERO_RANGE, or PUNCH_HOLE without REQ_NOUNMAP) here. A punched hole must read back as zeroes, which
   * trim does not promise and Node cannot punch holes in a backing file; turned into zero writes, every
   * discard (mkfs discards the whole device, fstrim all free space) would write the full range and
   * copy-before-write each chunk of it. So PUNCH_HOLE is refused with EOPNOTSUPP: the loop driver then
   * stops offering discard and the kernel falls back to writing zeroes where zeroes are needed. ZERO_RANGE
   * is an explicit zeroing request and is served; allocation is a no-op (the file is fully allocated).
   */
  private async fallocate(request: Request): Promise<void> {
    const { view } = request;
    const at = abi.FUSE_IN_HEADER_BYTES;
    const node = this.liveHandle(view.getBigUint64(at, true));
    const offset = view.getBigUint64(at + 8, true);
    const length = view.getBigUint64(at + 16, true);
    const mode = view.getUint32(at + 24, true);
    const device = node.entry.device;
    if ((mode & ~(abi.FALLOC_FL_KEEP_SIZE | abi.FALLOC_FL_ZERO_RANGE)) !== 0) {
      throw new BlockError("ENOTSUP", `fallocate mode ${mode} is not supported`);
    }
    const sizeBytes = BigInt(device.sizeBytes);
    const keepSize = (mode & abi.FALLOC_FL_KEEP_SIZE) !== 0;
    if (offset + length > sizeBytes && !keepSize) {
      throw new BlockError("EFBIG", "the size of an export is fixed");
    }
    if ((mode & abi.FALLOC_FL_ZERO_RANGE) !== 0 && offset < sizeBytes && length > 0n) {
      const endBytes = Number(offset + length < sizeBytes ? offset + length : sizeBytes);
      await zeroRange(device, Number(offset), endBytes);
    }
    this.replyOk(request, 0);
  }

  private opendir(request: Request): void {
    if (request.nodeId !== abi.FUSE_ROOT_ID) throw new BlockError("ENOTDIR", "not a directory");
    const handle = this.allocateHandle();
    this.directoryHandles.set(handle, this.listDirectory());
    this.writeOpenOut(request.view, handle, 0);
    this.replyOk(request, abi.FUSE_OPEN_OUT_BYTES);
  }

  private readdir(request: Request): void {
    const { view, slot } = request;
    const at = abi.FUSE_IN_HEADER_BYTES;
    const handle = view.getBigUint64(at, true);
    const offset = view.getBigUint64(at + 8, true);
    const sizeBytes = Math.min(view.getUint32(at + 16, true), slot.byteLength - abi.FUSE_OUT_HEADER_BYTES);
    let entries = this.directoryHandles.get(handle);
    if (!entries && handle >= this.predecessorHandlesBelow) {
      throw new BlockError("EIO", "readdir on an unknown directory handle");
    }
    // A directory handle a predecessor process opened (they are not handed over): list afresh.
    if (!entries || offset === 0n) {
      // rewinddir(): a new pass sees the exports of now.
      entries = this.listDirectory();
      this.directoryHandles.set(handle, entries);
    }
    let used = 0;
    for (let index = Number(offset); index < entries.length; index += 1) {
      const entry = entries[index]!;
      const name = textEncoder.encode(entry.name);
      const recordBytes = abi.fuseRecordAlign(abi.FUSE_NAME_OFFSET + name.byteLength);
      if (used + recordBytes > sizeBytes) break;
      const recordAt = abi.FUSE_OUT_HEADER_BYTES + used;
      view.setBigUint64(recordAt, BigInt(entry.nodeId), true);
      view.setBigUint64(recordAt + 8, BigInt(index + 1), true);
      view.setUint32(recordAt + 16, name.byteLength, true);
      view.setUint32(recordAt + 20, entry.type, true);
      slot.set(name, recordAt + abi.FUSE_NAME_OFFSET);
      slot.fill(0, recordAt + abi.FUSE_NAME_OFFSET + name.byteLength, recordAt + recordBytes);
      used += recordBytes;
    }
    this.replyOk(request, used);
  }

  private statfs(request: Request): void {
    const exports = this.options.source.listExports();
    let blocks = 0n;
    for (const entry of exports) blocks += BigInt(Math.ceil(entry.device.sizeBytes / statfsBlockBytes));
    const { view } = request;
    const at = abi.FUSE_OUT_HEADER_BYTES;
    request.slot.fill(0, at, at + abi.FUSE_STATFS_OUT_BYTES);
    view.setBigUint64(at + 0, blocks, true);
    view.setBigUint64(at + 24, BigInt(exports.length + 1), true);
    view.setUint32(at + 40, statfsBlockBytes, true);
    view.setUint32(at + 44, nameLengthMax, true);
    view.setUint32(at + 48, statfsBlockBytes, true);
    this.replyOk(request, abi.FUSE_STATFS_OUT_BYTES);
  }

  private access(request: Request): void {
    const mask = request.view.getUint32(abi.FUSE_IN_HEADER_BYTES, true);
    if (request.nodeId !== abi.FUSE_ROOT_ID) {
      const node = this.table.node(this.nodeNumber(request.nodeId));
      if (!node?.alive) throw new BlockError("ENOENT", "access to a vanished export");
      if ((mask & X_OK) !== 0 || ((mask & abi.W_OK) !== 0 && node.entry.readOnly)) {
        throw new BlockError("EACCES", `access ${mask} denied on ${JSON.stringify(node.name)}`);
      }
    }
    this.replyOk(request, 0);
  }

  private listDirectory(): DirectoryEntry[] {
    const entries: DirectoryEntry[] = [
      { name: ".", nodeId: 1, type: abi.DT_DIR },
      { name: "..", nodeId: 1, type: abi.DT_DIR },
    ];
    for (const node of this.table.list())
      entries.push({ name: node.name, nodeId: node.nodeId, type: abi.DT_REG });
    this.handOverNewNodes();
    return entries;
  }

  private registerDirectRead(handle: bigint, node: FileNode): void {
    const { device } = node.entry;
    const directFd = device.directReadFd?.() ?? null;
    if (directFd !== null && this.options.directReads?.open(handle, directFd, device.sizeBytes)) {
      this.directHandles.add(handle);
    }
  }

  private handOverNewNodes(): void {
    if (this.table.nextNodeId !== this.handedOverNextNodeId) this.handOver();
  }

  private handOver(): void {
    const { onStateChanged } = this.options;
    if (!onStateChanged) return;
    const state = this.exportState();
    this.handedOverNextNodeId = state.nextNodeId;
    onStateChanged(state);
  }

  private closeDirectRead(handle: bigint): void {
    if (this.directHandles.delete(handle)) this.options.directReads?.close(handle);
  }

  private liveHandle(handle: bigint): FileNode {
    const node = this.fileHandles.get(handle);
    if (!node) throw new BlockError("EIO", `unknown file handle ${handle}`);
    if (!node.alive) throw new BlockError("EIO", `export ${JSON.stringify(node.name)} is gone`);
    return node;
  }

  private allocateHandle(): bigint {
    if (this.fileHandles.size + this.directoryHandles.size >= this.handlesMax) {
      throw new BlockError("ENOMEM", `too many open handles (${this.handlesMax})`);
    }
    const handle = this.nextHandle;
    this.nextHandle += 1n;
    return handle;
  }

  /** Node ids on the wire are u64; ours are safe integers, so anything larger names no node. */
  private nodeNumber(nodeId: bigint): number {
    return nodeId <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(nodeId) : -1;
  }

  private nameOf(request: Request): string {
    let end = request.lengthBytes;
    while (end > abi.FUSE_IN_HEADER_BYTES && request.slot[end - 1] === 0) end -= 1;
    return textDecoder.decode(request.slot.subarray(abi.FUSE_IN_HEADER_BYTES, end));
  }

  private writeAttrOutHeader(view: DataView): void {
    const at = abi.FUSE_OUT_HEADER_BYTES;
    view.setBigUint64(at, 0n, true);
    view.setUint32(at + 8, 0, true);
    view.setUint32(at + 12, 0, true);
  }

  private writeOpenOut(view: DataView, handle: bigint, openFlags: number): void {
    const at = abi.FUSE_OUT_HEADER_BYTES;
    view.setBigUint64(at, handle, true);
    view.setUint32(at + 8, openFlags, true);
    view.setUint32(at + 12, 0, true);
  }

  private writeFileAttr(view: DataView, at: number, node: FileNode): void {
    const sizeBytes = node.entry.device.sizeBytes;
    this.writeAttr(view, at, BigInt(node.nodeId), BigInt(sizeBytes), fileMode(node), 1);
  }

  private writeRootAttr(view: DataView, at: number): void {
    this.writeAttr(view, at, abi.FUSE_ROOT_ID, 0n, abi.S_IFDIR | 0o755, 2);
  }

  /** struct fuse_attr */
  private writeAttr(
    view: DataView,
    at: number,
    ino: bigint,
    size: bigint,
    mode: number,
    nlink: number,
  ): void {
    view.setBigUint64(at + 0, ino, true);
    view.setBigUint64(at + 8, size, true);
    view.setBigUint64(at + 16, (size + 511n) / 512n, true);
    view.setBigUint64(at + 24, this.startSeconds, true);
    view.setBigUint64(at + 32, this.startSeconds, true);
    view.setBigUint64(at + 40, this.startSeconds, true);
    view.setUint32(at + 48, 0, true);
    view.setUint32(at + 52, 0, true);
    view.setUint32(at + 56, 0, true);
    view.setUint32(at + 60, mode, true);
    view.setUint32(at + 64, nlink, true);
    view.setUint32(at + 68, this.uid, true);
    view.setUint32(at + 72, this.gid, true);
    view.setUint32(at + 76, 0, true);
    view.setUint32(at + 80, pageBytes, true);
    view.setUint32(at + 84, 0, true);
  }

  private replyOk(request: Request, bodyBytes: number): void {
    this.sendReply(request, 0, bodyBytes);
  }

  private replyError(request: Request, fuseError: number): void {
    assert(fuseError < 0, "FUSE errors are negative");
    this.sendReply(request, fuseError, 0);
  }

  private sendReply(request: Request, fuseError: number, bodyBytes: number): void {
    const totalBytes = abi.FUSE_OUT_HEADER_BYTES + bodyBytes;
    assert(totalBytes <= request.slot.byteLength, "FUSE reply larger than its slot");
    request.view.setUint32(0, totalBytes, true);
    request.view.setInt32(4, fuseError, true);
    request.view.setBigUint64(8, request.unique, true);
    this.options.send(request.slot.subarray(0, totalBytes));
  }
}

function fileMode(node: FileNode): number {
  return abi.S_IFREG | (node.entry.readOnly ? 0o400 : 0o600);
}

async function zeroRange(device: BlockDevice, startBytes: number, endBytes: number): Promise<void> {
  for (let offsetBytes = startBytes; offsetBytes < endBytes; offsetBytes += zeroStepBytes) {
    const lengthBytes = Math.min(zeroStepBytes, endBytes - offsetBytes);
    await device.writeZeroes(offsetBytes, lengthBytes, { noHole: true });
    if (offsetBytes + lengthBytes < endBytes) await new Promise<void>((resolve) => setImmediate(resolve));
  }
}
