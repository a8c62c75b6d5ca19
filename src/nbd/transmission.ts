/**
 * The transmission phase: runs one validated request against the session's device and sends its reply
 * (libnbd's ISSUE_COMMAND / REPLY groups, server side). Requests run concurrently and reply out of order.
 * Every reply leaves through ReplySink.sendReply() as whole messages, and the messages of one reply are
 * sent with no await between them, so chunks of different replies never interleave on the wire.
 *
 * READ builds header and data in one Buffer (data read in place, no copy), taken from the server's
 * BufferPool and returned to it once the socket has written it. With structured replies, a read of a
 * device that reports extents may answer zero runs with NBD_REPLY_TYPE_OFFSET_HOLE chunks (never under
 * DF); the data is read first, so an error can still be a single ERROR chunk. Errors of READ and
 * BLOCK_STATUS are structured when structured replies were negotiated, every other reply is simple (as
 * nbdkit does).
 *
 * BLOCK_STATUS answers one chunk per context selected at SET_META_CONTEXT (base:allocation from the
 * device's extents, then the export's own contexts such as qemu:dirty-bitmap:cbt), each clipped to the
 * request, at most extentsPerReplyMax descriptors (one with REQ_ONE); the last chunk carries DONE.
 *
 * Error model: a BlockError's errno goes through errno-map.ts; a broken invariant (AssertionError, here or
 * below) is answered EIO and then ends the daemon (util/broken-invariant.ts); anything else thrown below is
 * a bug that we log and answer EIO, and the connection stays up. execute() never rejects.
 *
 * TRIM and WRITE_ZEROES run in slices that yield to the event loop (inSlices).
 *
 * Not done: CACHE is a validated no-op (a prefetch hint that promises nothing); no NBD_REPLY_TYPE_ERROR_OFFSET.
 */

import type { AssertionError } from "node:assert";
import type { Extent, ZeroFlags } from "../block/device.js";
import type { Errno } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { crashOnBrokenInvariant } from "../util/broken-invariant.js";
import type { Logger } from "../util/logger.js";
import type { BufferPool } from "./buffer-pool.js";
import { errnoOfThrown, nbdErrorOfErrno } from "./errno-map.js";
import { extentsPerReplyMax, holeChunkBytesMin, zeroSliceBytes } from "./nbd-limits.js";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_HEADER_BYTES,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STRUCTURED_REPLY_HEADER_BYTES,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./nbd-protocol.js";
import type { NbdSession } from "./nbd-session.js";

export interface ReplySink {
  /**
   * Sends one whole message. Messages sent without an await between them reach the socket in order.
   * `onWritten` runs once the socket no longer needs the message (written, or the connection is gone).
   */
  sendReply(message: Buffer, onWritten?: () => void): void;
}

/** One parsed request. The cookie is kept as two u32 halves and echoed unchanged. */
export interface NbdRequest {
  readonly command: number;
  readonly commandFlags: number;
  readonly cookieHigh: number;
  readonly cookieLow: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** WRITE payload. */
  readonly payload: Buffer | undefined;
  /**
   * READ: told when the reply buffer is taken from the pool (true) and when the socket no longer needs it
   * (false), so the connection can hold the request's memory budget until then.
   */
  readonly onReplyBuffer?: (isTaken: boolean) => void;
}

const offsetDataHeaderBytes = NBD_STRUCTURED_REPLY_HEADER_BYTES + 8;
const fuaWriteFlags = { fua: true } as const;
const errorMessageCharsMax = 200;

export class Transmission {
  readonly session: NbdSession;
  private readonly sink: ReplySink;
  private readonly logger: Logger;
  private readonly pool: BufferPool;

  constructor(
    session: NbdSession,
    sink: ReplySink,
    options: { readonly logger: Logger; readonly pool: BufferPool },
  ) {
    this.session = session;
    this.sink = sink;
    this.logger = options.logger;
    this.pool = options.pool;
  }

  /** Runs a request that passed validateRequest() and sends its reply. Never rejects. */
  async execute(request: NbdRequest): Promise<void> {
    try {
      switch (request.command) {
        case NBD_CMD_READ:
          await this.read(request);
          return;
        case NBD_CMD_WRITE:
          await this.session.device.write(
            request.offsetBytes,
            request.payload!,
            (request.commandFlags & NBD_CMD_FLAG_FUA) !== 0 ? fuaWriteFlags : undefined,
          );
          break;
        case NBD_CMD_FLUSH:
          await this.session.device.flush();
          break;
        case NBD_CMD_TRIM: {
          const flags = (request.commandFlags & NBD_CMD_FLAG_FUA) !== 0 ? fuaWriteFlags : undefined;
          await inSlices(request, (offsetBytes, lengthBytes) =>
            this.session.device.trim(offsetBytes, lengthBytes, flags),
          );
          break;
        }
        case NBD_CMD_WRITE_ZEROES: {
          const flags = zeroFlagsOf(request);
          await inSlices(request, (offsetBytes, lengthBytes) =>
            this.session.device.writeZeroes(offsetBytes, lengthBytes, flags),
          );
          break;
        }
        case NBD_CMD_BLOCK_STATUS:
          await this.blockStatus(request);
          return;
        case NBD_CMD_CACHE:
          break;
        default:
          assert(false, `execute() called with unvalidated command ${request.command}`);
      }
      this.sendSimpleReply(request, 0);
    } catch (error) {
      this.sendThrown(request, error);
    }
  }

  /** Answers a request with an errno, structured where the protocol wants it. */
  sendError(request: NbdRequest, errno: Errno, message = ""): void {
    const nbdError = nbdErrorOfErrno(errno, request.commandFlags);
    const isStructured =
      this.session.structuredReplies &&
      (request.command === NBD_CMD_READ || request.command === NBD_CMD_BLOCK_STATUS);
    if (!isStructured) {
      this.sendSimpleReply(request, nbdError);
      return;
    }
    // u32 error, u16 message length, message.
    const text = Buffer.from(message.slice(0, errorMessageCharsMax), "utf8");
    const reply = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + 6 + text.byteLength);
    writeStructuredHeader(reply, 0, request, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + text.byteLength);
    reply.writeUInt32BE(nbdError, NBD_STRUCTURED_REPLY_HEADER_BYTES);
    reply.writeUInt16BE(text.byteLength, NBD_STRUCTURED_REPLY_HEADER_BYTES + 4);
    text.copy(reply, NBD_STRUCTURED_REPLY_HEADER_BYTES + 6);
    this.sink.sendReply(reply);
  }

  private sendThrown(request: NbdRequest, error: unknown): void {
    const { errno, kind } = errnoOfThrown(error);
    if (kind === "broken-invariant") {
      const fields = { export: this.session.exportName, command: request.command };
      crashOnBrokenInvariant(error as AssertionError, this.logger, fields, "an NBD request");
      this.sendError(request, errno);
      return;
    }
    if (kind === "bug") {
      this.logger.error(
        { err: error, export: this.session.exportName, command: request.command },
        "NBD request failed with an unexpected error (a bug below the NBD face); answered EIO",
      );
      this.sendError(request, errno);
      return;
    }
    this.sendError(request, errno, (error as Error).message);
  }

  private sendSimpleReply(request: NbdRequest, nbdError: number): void {
    const reply = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_HEADER_BYTES);
    writeSimpleHeader(reply, request, nbdError);
    this.sink.sendReply(reply);
  }

  private async read(request: NbdRequest): Promise<void> {
    const device = this.session.device;
    const { offsetBytes, lengthBytes } = request;
    if (!this.session.structuredReplies) {
      const reply = await this.readInto(request, NBD_SIMPLE_REPLY_HEADER_BYTES);
      writeSimpleHeader(reply, request, 0);
      this.sink.sendReply(reply, () => this.releaseReply(request, reply));
      return;
    }
    const mayHaveHoles =
      device.capabilities.canExtents &&
      device.extents !== undefined &&
      (request.commandFlags & NBD_CMD_FLAG_DF) === 0 &&
      lengthBytes >= holeChunkBytesMin;
    const extents = mayHaveHoles ? await device.extents!(offsetBytes, lengthBytes) : undefined;
    if (extents && extents.length === 1 && extents[0]!.isZero && extents[0]!.lengthBytes >= lengthBytes) {
      this.sendHoleChunk(request, offsetBytes, lengthBytes, NBD_REPLY_FLAG_DONE);
      return;
    }
    const reply = await this.readInto(request, offsetDataHeaderBytes);
    if (extents?.some((extent) => extent.isZero && extent.lengthBytes >= holeChunkBytesMin)) {
      this.sendReadWithHoles(request, reply, extents);
      return;
    }
    writeStructuredHeader(
      reply,
      0,
      request,
      NBD_REPLY_FLAG_DONE,
      NBD_REPLY_TYPE_OFFSET_DATA,
      8 + lengthBytes,
    );
    writeU64(reply, NBD_STRUCTURED_REPLY_HEADER_BYTES, offsetBytes);
    this.sink.sendReply(reply, () => this.releaseReply(request, reply));
  }

  /** A pooled buffer of header room + the request's data, read from the device. */
  private async readInto(request: NbdRequest, headerBytes: number): Promise<Buffer> {
    const reply = this.pool.acquire(headerBytes + request.lengthBytes);
    request.onReplyBuffer?.(true);
    try {
      await this.session.device.read(request.offsetBytes, reply.subarray(headerBytes));
    } catch (error) {
      this.releaseReply(request, reply);
      throw error;
    }
    return reply;
  }

  private releaseReply(request: NbdRequest, reply: Buffer): void {
    this.pool.release(reply);
    request.onReplyBuffer?.(false);
  }

  /**
   * Sends the data read into `reply` (after its 28-byte header room) as OFFSET_DATA and OFFSET_HOLE chunks
   * following the extents; the last chunk carries DONE. Runs without await: the chunks stay together.
   */
  private sendReadWithHoles(request: NbdRequest, reply: Buffer, extents: readonly Extent[]): void {
    const { offsetBytes, lengthBytes } = request;
    // Runs of [start, end, isHole] relative to the request, data runs merged, short holes sent as data.
    const runs: Array<[number, number, boolean]> = [];
    let positionBytes = 0;
    for (const extent of extents) {
      if (positionBytes >= lengthBytes) break;
      const endBytes = Math.min(lengthBytes, positionBytes + extent.lengthBytes);
      const isHole = extent.isZero && endBytes - positionBytes >= holeChunkBytesMin;
      const last = runs[runs.length - 1];
      if (last && !last[2] && !isHole) last[1] = endBytes;
      else runs.push([positionBytes, endBytes, isHole]);
      positionBytes = endBytes;
    }
    // Extents may cover less than asked: the rest is data.
    if (positionBytes < lengthBytes) {
      const last = runs[runs.length - 1];
      if (last && !last[2]) last[1] = lengthBytes;
      else runs.push([positionBytes, lengthBytes, false]);
    }
    assert(
      runs.length > 0 && runs[0]![0] === 0 && runs.at(-1)![1] === lengthBytes,
      "the read's chunks start at its offset and end at its end",
    );
    for (let index = 1; index < runs.length; index += 1) {
      assert(runs[index]![0] === runs[index - 1]![1], "the read's chunks are contiguous");
    }
    // The data chunks are views of `reply`: it goes back to the pool once the last message was written.
    const release = () => this.releaseReply(request, reply);
    for (let index = 0; index < runs.length; index += 1) {
      const [startBytes, endBytes, isHole] = runs[index]!;
      const isLast = index === runs.length - 1;
      const flags = isLast ? NBD_REPLY_FLAG_DONE : 0;
      if (isHole) {
        this.sendHoleChunk(
          request,
          offsetBytes + startBytes,
          endBytes - startBytes,
          flags,
          isLast ? release : undefined,
        );
        continue;
      }
      const header = Buffer.allocUnsafe(offsetDataHeaderBytes);
      writeStructuredHeader(header, 0, request, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + endBytes - startBytes);
      writeU64(header, NBD_STRUCTURED_REPLY_HEADER_BYTES, offsetBytes + startBytes);
      this.sink.sendReply(header);
      const data = reply.subarray(offsetDataHeaderBytes + startBytes, offsetDataHeaderBytes + endBytes);
      this.sink.sendReply(data, isLast ? release : undefined);
    }
  }

  private sendHoleChunk(
    request: NbdRequest,
    offsetBytes: number,
    lengthBytes: number,
    flags: number,
    onWritten?: () => void,
  ) {
    const chunk = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + 12);
    writeStructuredHeader(chunk, 0, request, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
    writeU64(chunk, NBD_STRUCTURED_REPLY_HEADER_BYTES, offsetBytes);
    chunk.writeUInt32BE(lengthBytes, NBD_STRUCTURED_REPLY_HEADER_BYTES + 8);
    this.sink.sendReply(chunk, onWritten);
  }

  /**
   * One BLOCK_STATUS chunk per selected context (base:allocation first, then the export's own), the last
   * with DONE. Every context is asked before anything is sent, so an error is still a single ERROR chunk
   * and the chunks leave without an await between them.
   */
  private async blockStatus(request: NbdRequest): Promise<void> {
    const { offsetBytes, lengthBytes } = request;
    const isReqOne = (request.commandFlags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const chunks: Array<{ readonly contextId: number; readonly descriptors: number[] }> = [];
    const baseContextId = this.session.baseAllocationContextId;
    if (baseContextId !== 0) {
      const extents = await this.session.device.extents!(offsetBytes, lengthBytes);
      const statuses = extents.map((extent) => ({
        lengthBytes: extent.lengthBytes,
        flags: (extent.isHole ? NBD_STATE_HOLE : 0) | (extent.isZero ? NBD_STATE_ZERO : 0),
      }));
      chunks.push({ contextId: baseContextId, descriptors: descriptorsOf(statuses, lengthBytes, isReqOne) });
    }
    for (const { id, context } of this.session.metaContexts) {
      const statuses = await context.extents(offsetBytes, lengthBytes);
      chunks.push({ contextId: id, descriptors: descriptorsOf(statuses, lengthBytes, isReqOne) });
    }
    const empty = chunks.find((chunk) => chunk.descriptors.length === 0);
    if (chunks.length === 0 || empty) {
      this.logger.error(
        { export: this.session.exportName, offsetBytes, contextId: empty?.contextId },
        "a metadata context returned no extents (a bug below the NBD face); answered EIO",
      );
      this.sendError(request, "EIO");
      return;
    }
    for (let index = 0; index < chunks.length; index += 1) {
      const { contextId, descriptors } = chunks[index]!;
      const flags = index === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      const payloadBytes = 4 + 4 * descriptors.length;
      const reply = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
      writeStructuredHeader(reply, 0, request, flags, NBD_REPLY_TYPE_BLOCK_STATUS, payloadBytes);
      let positionBytes = NBD_STRUCTURED_REPLY_HEADER_BYTES;
      reply.writeUInt32BE(contextId, positionBytes);
      positionBytes += 4;
      for (const value of descriptors) {
        reply.writeUInt32BE(value, positionBytes);
        positionBytes += 4;
      }
      this.sink.sendReply(reply);
    }
  }
}

/**
 * Block status descriptors (u32 length, u32 flags, flattened) from runs that start at the request's
 * offset: clipped to the request, consecutive runs with the same flags merged, at most extentsPerReplyMax
 * descriptors, one with REQ_ONE. Empty when the runs cover nothing.
 */
function descriptorsOf(
  runs: readonly { readonly lengthBytes: number; readonly flags: number }[],
  requestLengthBytes: number,
  isReqOne: boolean,
): number[] {
  const descriptors: number[] = [];
  let coveredBytes = 0;
  for (const run of runs) {
    if (coveredBytes >= requestLengthBytes) break;
    const lengthBytes = Math.min(run.lengthBytes, requestLengthBytes - coveredBytes);
    if (!(lengthBytes > 0)) continue;
    const count = descriptors.length;
    if (count > 0 && descriptors[count - 1] === run.flags) {
      descriptors[count - 2]! += lengthBytes;
    } else {
      if (count / 2 >= extentsPerReplyMax || (isReqOne && count > 0)) break;
      descriptors.push(lengthBytes, run.flags);
    }
    coveredBytes += lengthBytes;
  }
  assert(descriptors.length % 2 === 0, "descriptors come in (length, flags) pairs");
  assert(coveredBytes <= requestLengthBytes, "a status reply never covers more than the request");
  assert(!isReqOne || descriptors.length <= 2, "REQ_ONE answers one extent");
  return descriptors;
}

/**
 * Runs a TRIM or WRITE_ZEROES as consecutive calls of at most zeroSliceBytes, yielding to the event loop
 * between them (setImmediate: after pending I/O callbacks), so that a 4 GiB zeroing lets other clients'
 * requests, the control API and FUSE run in between instead of holding the loop for seconds. Done here,
 * once, above every device stack (backends, trackers, snapshot images): each slice is an ordinary request
 * to them. A failed slice fails the request; earlier slices stay done, as NBD allows for a failed write.
 */
async function inSlices(
  request: NbdRequest,
  run: (offsetBytes: number, lengthBytes: number) => Promise<void>,
): Promise<void> {
  const { offsetBytes, lengthBytes } = request;
  if (lengthBytes <= zeroSliceBytes) {
    await run(offsetBytes, lengthBytes);
    return;
  }
  for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += zeroSliceBytes) {
    if (doneBytes > 0) await new Promise<void>((resolve) => setImmediate(resolve));
    await run(offsetBytes + doneBytes, Math.min(zeroSliceBytes, lengthBytes - doneBytes));
  }
}

function zeroFlagsOf(request: NbdRequest): ZeroFlags | undefined {
  const flags = request.commandFlags;
  if ((flags & (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) === 0) return undefined;
  return {
    fua: (flags & NBD_CMD_FLAG_FUA) !== 0,
    noHole: (flags & NBD_CMD_FLAG_NO_HOLE) !== 0,
    fastZero: (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
  };
}

function writeSimpleHeader(target: Buffer, request: NbdRequest, nbdError: number): void {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  target.writeUInt32BE(nbdError, 4);
  target.writeUInt32BE(request.cookieHigh, 8);
  target.writeUInt32BE(request.cookieLow, 12);
}

function writeStructuredHeader(
  target: Buffer,
  at: number,
  request: NbdRequest,
  flags: number,
  type: number,
  payloadBytes: number,
): void {
  assert(target.byteLength >= at + NBD_STRUCTURED_REPLY_HEADER_BYTES, "room for the reply header");
  target.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  target.writeUInt16BE(flags, at + 4);
  target.writeUInt16BE(type, at + 6);
  target.writeUInt32BE(request.cookieHigh, at + 8);
  target.writeUInt32BE(request.cookieLow, at + 12);
  target.writeUInt32BE(payloadBytes, at + 16);
}

/** Writes a safe integer as u64 without BigInt. */
function writeU64(target: Buffer, at: number, value: number): void {
  const high = Math.floor(value / 2 ** 32);
  target.writeUInt32BE(high, at);
  target.writeUInt32BE(value - high * 2 ** 32, at + 4);
}
