/**
 * NbdConnection: the socket plumbing of one client. A byte-driven state machine in libnbd's style parses
 * what arrives, hands options to Handshake and requests to request-validation + Transmission, and writes
 * their replies. States (one line each):
 *
 *   RECV_CLIENT_FLAGS    4 bytes of client flags after our greeting
 *   RECV_OPTION_HEADER   IHAVEOPT, option, length (a bad magic, or a transmission request, drops us)
 *   RECV_OPTION_DATA     the option payload (≤ optionPayloadBytesMax), then Handshake.onOption()
 *   SKIP_OPTION_DATA     an oversize option payload, discarded as it arrives, then NBD_REP_ERR_TOO_BIG
 *   RECV_REQUEST_HEADER  28-byte request; validation; dispatch or an immediate error reply
 *   RECV_WRITE_PAYLOAD   a WRITE payload, copied as it arrives into one shared-memory buffer (a view when
 *                        it came in one socket read; see parseRequestHeader)
 *   SKIP_WRITE_PAYLOAD   the payload of a refused WRITE (≤ 2 × max), discarded, then the error reply
 *   FINISHING            nothing more is parsed; in-flight requests finish, replies flush, then end
 *   DEAD                 socket destroyed or closed
 *
 * Back-pressure: new requests are only parsed while fewer than inflightRequestsMax requests (and fewer
 * than inflightBytesMax bytes of READ/WRITE buffers) are in flight and while fewer than replyQueueBytesMax
 * reply bytes wait in the socket's write queue (the server sets the sockets' high-water mark to that value,
 * so this is exactly "write() returned false") or are being read for READs already started. The READs
 * count because their replies reach the queue only after the parse loop ends: without them, the 64
 * READs a client sends at once were all parsed and read before the first reply was queued, 16 MiB of
 * buffers per connection that went cold in the CPU caches before the socket copied them (nbdcopy: twice
 * the page faults and about 40 % more server CPU per GiB). Otherwise the socket is paused; parsing resumes when a
 * request completes, on 'drain', or when a write completes and the queue fell below replyQueueBytesLow.
 * That low-water mark matters: waiting for 'drain' alone (an empty queue) let the client run dry between
 * bursts and cost a third of the sequential-read throughput. The write queue is checked before every
 * request, not once per tick: requests that complete in microtasks could otherwise chain through
 * thousands of requests before the tick ends. So a client that never reads its replies costs a bounded
 * amount of memory. Payload bytes of a request already started are always read.
 *
 * Memory budget: before a READ or WRITE is taken off the wire, its data bytes are asked of the server's
 * InflightBudget (inflight-budget.ts) under this connection's client key. While they are not granted the
 * request header stays unparsed and the socket is paused, exactly as above; the grant resumes parsing.
 * A WRITE holds its bytes until the device settled it, a READ until the socket wrote its reply (a client
 * that does not read its replies keeps holding them: they are in our memory).
 *
 * Replies are batched: the first reply in a tick corks the socket and a process.nextTick() uncorks it, so
 * the replies of every request that completed in the same tick leave in one writev. A message is always
 * written whole in one write() call, so replies never interleave.
 *
 * Access rules reloaded while a client is in transmission (reviewAccess()): a grant that became `none` ends
 * the connection softly (in-flight requests reply first); `rw` that became `ro` answers every later
 * WRITE, TRIM and WRITE_ZEROES with EPERM (the flags sent at GO cannot be taken back); `ro` that became
 * `rw` takes effect at the client's next connection, since it was told the export is read-only.
 *
 * EOF from the client behaves like NBD_CMD_DISC once everything already received has been parsed;
 * EOF inside a payload drops that request. Locking: none, one event loop.
 */
import type { Socket } from "node:net";
import type { Errno } from "../block/errors.js";
import type { ExportSource } from "../block/export-source.js";
import { assert } from "../util/assert.js";
import type { Logger } from "../util/logger.js";
import { type AccessPolicy, allowAll } from "./access-rules.js";
import type { BufferPool } from "./buffer-pool.js";
import { ByteQueue } from "./byte-queue.js";
import type { HandshakeStep } from "./handshake.js";
import { Handshake } from "./handshake.js";
import type { InPlaceReceiver } from "./in-place-socket.js";
import type { BudgetTicket, InflightBudget } from "./inflight-budget.js";
import {
  handshakeTimeoutMs,
  inflightBytesMax,
  optionPayloadBytesMax,
  optionPayloadSkipBytesMax,
  replyQueueBytesLow,
  replyQueueBytesMax,
  writeSkipFactorMax,
} from "./nbd-limits.js";
import {
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_IHAVEOPT,
  NBD_OPTION_HEADER_BYTES,
  NBD_REQUEST_HEADER_BYTES,
  NBD_REQUEST_MAGIC,
} from "./nbd-protocol.js";
import { offsetBytesOf, validateRequest } from "./request-validation.js";
import { type NbdTls, peerIdentity, serverTlsSocket, tlsOff, untrustedPeer } from "./tls.js";
import type { NbdRequest, ReplySink } from "./transmission.js";
import { Transmission } from "./transmission.js";

type ConnectionState =
  | "RECV_CLIENT_FLAGS"
  | "RECV_OPTION_HEADER"
  | "RECV_OPTION_DATA"
  | "SKIP_OPTION_DATA"
  | "RECV_REQUEST_HEADER"
  | "RECV_WRITE_PAYLOAD"
  | "SKIP_WRITE_PAYLOAD"
  /** STARTTLS acknowledged; reading resumes once the TLS handshake is done. */
  | "UPGRADING"
  | "FINISHING"
  | "DEAD";

export interface NbdConnectionOptions {
  readonly source: ExportSource;
  readonly logger: Logger;
  readonly requestLengthBytesMax: number;
  readonly inflightRequestsMax: number;
  readonly pool: BufferPool;
  /** WRITE payloads that do not arrive in one socket read are received into these (shared memory). */
  readonly payloadPool: BufferPool;
  /** The server's budget of in-flight READ/WRITE bytes, shared by every connection. */
  readonly budget: InflightBudget;
  /** Who this connection belongs to, for the budget's per-client share (nbd-server.ts). */
  readonly clientKey: string;
  /** TLS set-up (tls.ts); default off. */
  readonly tls?: NbdTls;
  /** Who may use which export (access-rules.ts); default allowAll. */
  readonly access?: AccessPolicy;
  /**
   * The socket reads in place (in-place-socket.ts): headers land in this buffer, reused from read to
   * read, and WRITE payloads straight in their own buffers; nextReceiveBuffer() and onReceived() are its
   * `onread`. Absent: bytes come from 'data' events.
   */
  readonly receiveBuffer?: Buffer;
}

/** Counters for tests and monitoring. */
export interface NbdConnectionStats {
  readonly state: ConnectionState;
  readonly exportName: string | undefined;
  readonly requestsReceived: number;
  readonly inflightRequests: number;
  readonly inflightBytes: number;
  /** Reply bytes queued in the socket and not yet accepted by the kernel. */
  readonly queuedReplyBytes: number;
  /** Bytes received and not parsed yet. */
  readonly unparsedBytes: number;
  readonly isReadingPaused: boolean;
  readonly isWaitingForDrain: boolean;
  /** The next request waits for the server's in-flight memory budget. */
  readonly isWaitingForBudget: boolean;
}

interface PendingRequest extends NbdRequest {
  payload: Buffer | undefined;
  /** The payload came from the BufferPool and goes back once the request settled. */
  isPayloadPooled: boolean;
  /** Bytes of the server's budget this request holds, and what still holds them (execution, reply). */
  budgetBytes: number;
  budgetHolds: number;
}

/** In-place reads: the least of a payload still missing that is read into the payload itself. */
const payloadInPlaceBytesMin = 8 * 1024;
/** In-place reads: the least room behind the queued bytes for the next read into the receive buffer. */
const receiveRoomBytesMin = 16 * 1024;

export class NbdConnection implements ReplySink, InPlaceReceiver {
  readonly closed: Promise<void>;
  /** The plain socket, replaced by its TLS socket after STARTTLS. */
  private socket: Socket;
  private readonly tls: NbdTls;
  private readonly access: AccessPolicy;
  /** The grant went from rw to ro during the transmission (reviewAccess()): modifications get EPERM. */
  private isWriteRevoked = false;
  private readonly logger: Logger;
  private readonly requestLengthBytesMax: number;
  private readonly inflightRequestsMax: number;
  private readonly pool: BufferPool;
  private readonly payloadPool: BufferPool;
  private readonly budget: InflightBudget;
  private readonly clientKey: string;
  /** Budget asked for the request whose header is next in the queue. */
  private budgetTicket: BudgetTicket | undefined;
  private readonly queue: ByteQueue;
  private readonly receiveBuffer: Buffer | undefined;
  /** Where in receiveBuffer the next read lands; the queue's bytes lie before it. */
  private receiveFreeFromBytes = 0;
  private readonly handshake: Handshake;
  private transmission: Transmission | undefined;
  private state: ConnectionState = "RECV_CLIENT_FLAGS";
  private optionCode = 0;
  private optionLengthBytes = 0;
  private skipLeftBytes = 0;
  private pendingWrite: PendingRequest | undefined;
  private pendingWriteErrno: Errno | undefined;
  private payloadFilledBytes = 0;
  private inflightRequests = 0;
  private inflightBytes = 0;
  /** Bytes of READs dispatched whose replies are not in the socket's queue yet. */
  private readBytesInProgress = 0;
  private requestsReceived = 0;
  private isPumping = false;
  private isReadingPaused = false;
  private isCorked = false;
  private isPeerEnded = false;
  private isShuttingDown = false;
  private isEnding = false;
  private resolveClosed!: () => void;

  constructor(socket: Socket, options: NbdConnectionOptions) {
    this.socket = socket;
    this.logger = options.logger;
    this.requestLengthBytesMax = options.requestLengthBytesMax;
    this.inflightRequestsMax = options.inflightRequestsMax;
    this.pool = options.pool;
    this.payloadPool = options.payloadPool;
    this.budget = options.budget;
    this.clientKey = options.clientKey;
    this.tls = options.tls ?? tlsOff;
    this.access = options.access ?? allowAll;
    this.receiveBuffer = options.receiveBuffer;
    // Bytes in a reused receive buffer are overwritten by a later read: nothing may keep a view of them.
    this.queue = new ByteQueue({ lendsViews: this.receiveBuffer === undefined });
    this.handshake = new Handshake({
      source: options.source,
      requestLengthBytesMax: options.requestLengthBytesMax,
      tlsMode: this.tls.mode,
      access: this.access,
    });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.attach(socket);
    socket.setTimeout(handshakeTimeoutMs);
    this.sendReply(Handshake.greeting());
  }

  private attach(socket: Socket): void {
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("end", () => {
      this.isPeerEnded = true;
      // A client gone in the middle of the TLS handshake has nothing left to say: do not wait for the timeout.
      if (this.state === "UPGRADING") {
        this.logger.debug("NBD client closed during the TLS handshake");
        this.destroy();
        return;
      }
      this.pump();
    });
    socket.on("drain", () => this.pump());
    socket.on("error", (error) => {
      this.logger.debug({ err: error }, "NBD connection error");
      this.destroy();
    });
    socket.on("close", () => {
      this.state = "DEAD";
      this.queue.clear();
      this.dropBudgetTicket();
      this.resolveClosed();
    });
    socket.on("timeout", () => {
      if (this.transmission === undefined) this.die("handshake timed out");
    });
  }

  /**
   * STARTTLS was accepted: nothing more may be read in plain text (a byte already here came before our
   * ACK: a protocol violation), the ACK goes out, and then the TLS layer takes the socket over and reads
   * the ClientHello itself. The handshake timeout keeps running through the TLS handshake.
   */
  private startTls(ack: readonly Buffer[]): boolean {
    if (this.queue.lengthBytes > 0) {
      this.die("data after NBD_OPT_STARTTLS before its reply");
      return false;
    }
    const plain = this.socket;
    plain.pause();
    plain.removeAllListeners("data");
    plain.removeAllListeners("end");
    plain.removeAllListeners("drain");
    plain.removeAllListeners("timeout");
    plain.removeAllListeners("close");
    // A late error on the plain socket must not be unhandled; the TLS socket reports its own.
    plain.removeAllListeners("error");
    plain.on("error", () => {});
    this.state = "UPGRADING";
    plain.write(Buffer.concat(ack), () => {
      if (this.state !== "UPGRADING") return;
      const secure = serverTlsSocket(plain, this.tls);
      this.socket = secure;
      this.attach(secure);
      secure.setTimeout(handshakeTimeoutMs);
      secure.once("secure", () => {
        if (this.state !== "UPGRADING") return;
        const identity = peerIdentity(secure, this.tls);
        if (identity === untrustedPeer) {
          this.die("client certificate not signed by the --tls-ca authority");
          return;
        }
        this.handshake.onTlsStarted(identity);
        this.state = "RECV_OPTION_HEADER";
        this.logger.debug({ protocol: secure.getProtocol() }, "NBD TLS started");
        this.pump();
      });
    });
    return false;
  }

  get stats(): NbdConnectionStats {
    return {
      state: this.state,
      exportName: this.transmission?.session.exportName,
      requestsReceived: this.requestsReceived,
      inflightRequests: this.inflightRequests,
      inflightBytes: this.inflightBytes,
      queuedReplyBytes: this.socket.writableLength,
      unparsedBytes: this.queue.lengthBytes,
      isReadingPaused: this.isReadingPaused,
      isWaitingForDrain: this.socket.writableLength >= replyQueueBytesMax,
      isWaitingForBudget: this.budgetTicket !== undefined && !this.budgetTicket.isGranted,
    };
  }

  /**
   * The server is closing: options get NBD_REP_ERR_SHUTDOWN, new requests ESHUTDOWN; the connection ends
   * as soon as nothing is in flight.
   */
  beginShutdown(): void {
    this.isShuttingDown = true;
    this.handshake.isShuttingDown = true;
    if (this.transmission === undefined) {
      this.finish("server is shutting down");
      return;
    }
    this.pump();
  }

  /**
   * The access rules changed: apply them to a connection in transmission (see the notes above). Returns
   * what happened, for the server's log. A connection still haggling needs nothing: the handshake asks
   * the policy at every option.
   */
  reviewAccess(): "kept" | "read-only" | "closed" {
    const session = this.transmission?.session;
    if (session === undefined || this.state === "FINISHING" || this.state === "DEAD") return "kept";
    const grant = this.access.grantFor(this.handshake.clientIdentity, session.exportName);
    if (grant === "none") {
      this.logger.info({ export: session.exportName }, "NBD access revoked: closing the connection");
      this.finish("access revoked");
      return "closed";
    }
    this.isWriteRevoked = grant === "ro" && !session.isReadOnly;
    return this.isWriteRevoked ? "read-only" : "kept";
  }

  /** Hard disconnect, now. */
  destroy(): void {
    this.state = "DEAD";
    this.queue.clear();
    this.dropBudgetTicket();
    this.socket.destroy();
  }

  sendReply(message: Buffer, onWritten?: () => void): void {
    if (this.state === "DEAD" || this.socket.destroyed) {
      onWritten?.();
      return;
    }
    if (!this.isCorked) {
      this.isCorked = true;
      this.socket.cork();
      process.nextTick(uncorkTick, this);
    }
    if (onWritten === undefined) {
      this.socket.write(message);
      return;
    }
    this.socket.write(message, () => {
      onWritten();
      this.onReplyWritten();
    });
  }

  /** A write with a callback completed: resume parsing once the queue is below its low-water mark. */
  private onReplyWritten(): void {
    if (this.isReadingPaused && this.socket.writableLength < replyQueueBytesLow) this.pump();
  }

  /** @internal process.nextTick target: flush the replies of this tick in one writev. */
  uncork(): void {
    this.isCorked = false;
    if (this.socket.destroyed) return;
    this.socket.uncork();
  }

  private onData(chunk: Buffer): void {
    if (this.state === "FINISHING" || this.state === "DEAD") return;
    this.queue.push(chunk);
    this.pump();
  }

  /**
   * In-place reads: the rest of a WRITE payload goes straight into its buffer when enough of it is
   * missing to be worth a read of its own; anything else into the receive buffer after the bytes the
   * queue still holds (moved out of the way first when too little room is left behind them).
   */
  nextReceiveBuffer(): Uint8Array {
    const receiveBuffer = this.receiveBuffer;
    assert(receiveBuffer, "in-place reads need a receive buffer");
    const write = this.pendingWrite;
    if (this.state === "RECV_WRITE_PAYLOAD" && write?.payload !== undefined) {
      const missingBytes = write.lengthBytes - this.payloadFilledBytes;
      if (missingBytes >= payloadInPlaceBytesMin) return write.payload.subarray(this.payloadFilledBytes);
    }
    if (this.queue.lengthBytes === 0) this.receiveFreeFromBytes = 0;
    else if (receiveBuffer.byteLength - this.receiveFreeFromBytes < receiveRoomBytesMin) {
      this.queue.ownBytes();
      this.receiveFreeFromBytes = 0;
    }
    return receiveBuffer.subarray(this.receiveFreeFromBytes);
  }

  /** In-place reads: `count` bytes arrived at the start of `buffer`, which nextReceiveBuffer() chose. */
  onReceived(count: number, buffer: Uint8Array): void {
    if (this.state === "FINISHING" || this.state === "DEAD") return;
    const receiveBuffer = this.receiveBuffer;
    assert(receiveBuffer, "in-place reads need a receive buffer");
    if (buffer.buffer === receiveBuffer.buffer) {
      assert(
        buffer.byteOffset === receiveBuffer.byteOffset + this.receiveFreeFromBytes,
        "reads land after the queue",
      );
      const fromBytes = this.receiveFreeFromBytes;
      this.receiveFreeFromBytes += count;
      this.queue.push(receiveBuffer.subarray(fromBytes, this.receiveFreeFromBytes));
    } else {
      const write = this.pendingWrite;
      assert(
        this.state === "RECV_WRITE_PAYLOAD" && write?.payload?.buffer === buffer.buffer,
        "a read outside the receive buffer fills the pending payload",
      );
      this.payloadFilledBytes += count;
      assert(this.payloadFilledBytes <= write.lengthBytes, "a payload read stays within the payload");
    }
    this.pump();
  }

  private pump(): void {
    if (this.isPumping) return;
    this.isPumping = true;
    try {
      while (this.step()) {
        // Each step consumes input or changes state; it returns false when it must wait.
      }
    } finally {
      this.isPumping = false;
    }
    this.updateReading();
  }

  /** One state's worth of parsing; false when it must wait for more bytes (or is done). */
  private step(): boolean {
    switch (this.state) {
      case "RECV_CLIENT_FLAGS":
        return this.recvClientFlags();
      case "RECV_OPTION_HEADER":
        return this.recvOptionHeader();
      case "RECV_OPTION_DATA":
        return this.recvOptionData();
      case "SKIP_OPTION_DATA":
        return this.skipOptionData();
      case "RECV_REQUEST_HEADER":
        return this.recvRequestHeader();
      case "RECV_WRITE_PAYLOAD":
        return this.recvWritePayload();
      case "SKIP_WRITE_PAYLOAD":
        return this.skipWritePayload();
      case "UPGRADING":
      case "FINISHING":
      case "DEAD":
        return false;
    }
  }

  private recvClientFlags(): boolean {
    if (!this.hasBytes(4)) return false;
    const header = this.queue.peek(4);
    const clientFlags = header.readUInt32BE(this.queue.peekOffsetBytes);
    this.queue.skip(4);
    return this.applyHandshakeStep(this.handshake.onClientFlags(clientFlags));
  }

  private recvOptionHeader(): boolean {
    if (!this.hasBytes(NBD_OPTION_HEADER_BYTES)) return false;
    const header = this.queue.peek(NBD_OPTION_HEADER_BYTES);
    const at = this.queue.peekOffsetBytes;
    if (header.readBigUInt64BE(at) !== NBD_IHAVEOPT) {
      this.die("bad option magic during the handshake");
      return false;
    }
    this.optionCode = header.readUInt32BE(at + 8);
    this.optionLengthBytes = header.readUInt32BE(at + 12);
    this.queue.skip(NBD_OPTION_HEADER_BYTES);
    if (this.optionLengthBytes > optionPayloadSkipBytesMax) {
      this.die(`option payload of ${this.optionLengthBytes} bytes`);
      return false;
    }
    if (this.optionLengthBytes > optionPayloadBytesMax) {
      this.skipLeftBytes = this.optionLengthBytes;
      this.state = "SKIP_OPTION_DATA";
    } else {
      this.state = "RECV_OPTION_DATA";
    }
    return true;
  }

  private recvOptionData(): boolean {
    if (!this.hasBytes(this.optionLengthBytes)) return false;
    const payload = this.queue.take(this.optionLengthBytes);
    return this.applyHandshakeStep(this.handshake.onOption(this.optionCode, payload));
  }

  private skipOptionData(): boolean {
    this.skipLeftBytes -= this.queue.skip(this.skipLeftBytes);
    if (this.skipLeftBytes > 0) return this.waitForBytes();
    return this.applyHandshakeStep(this.handshake.onOversizeOption(this.optionCode));
  }

  private recvRequestHeader(): boolean {
    if (this.isShuttingDown && this.inflightRequests === 0) {
      this.finish("server is shutting down");
      return false;
    }
    if (!this.canStartRequest()) return false;
    if (!this.hasBytes(NBD_REQUEST_HEADER_BYTES)) return false;
    if (!this.hasBudgetForNextRequest()) return false;
    return this.parseRequestHeader();
  }

  /**
   * Asks the server's budget for the data bytes of the request whose header is next (a READ or WRITE that
   * will hold a buffer); true once they are granted. Not granted: the header stays unparsed, the socket is
   * paused (isBlocked), and the grant pumps again.
   */
  private hasBudgetForNextRequest(): boolean {
    if (this.budgetTicket !== undefined) return this.budgetTicket.isGranted;
    const header = this.queue.peek(NBD_REQUEST_HEADER_BYTES);
    const at = this.queue.peekOffsetBytes;
    if (header.readUInt32BE(at) !== NBD_REQUEST_MAGIC) return true;
    const command = header.readUInt16BE(at + 6);
    const lengthBytes = header.readUInt32BE(at + 24);
    const holdsBuffer =
      (command === NBD_CMD_READ || command === NBD_CMD_WRITE) &&
      lengthBytes > 0 &&
      lengthBytes <= this.requestLengthBytesMax &&
      !this.isShuttingDown;
    if (!holdsBuffer) return true;
    const ticket = this.budget.request(this.clientKey, lengthBytes, () => this.pump());
    this.budgetTicket = ticket;
    return ticket.isGranted;
  }

  /** A ticket not handed to a request (connection gone, or the request needs no buffer after all). */
  private dropBudgetTicket(): void {
    if (this.budgetTicket !== undefined) {
      this.budget.cancel(this.budgetTicket);
      this.budgetTicket = undefined;
    }
    // A WRITE whose payload was still arriving is never dispatched now.
    const write = this.pendingWrite;
    this.pendingWrite = undefined;
    if (write !== undefined && write.budgetHolds > 0) this.releaseBudgetHold(write);
  }

  private recvWritePayload(): boolean {
    const request = this.pendingWrite;
    assert(request?.payload, "a write payload is read for a pending write");
    const lengthBytes = request.lengthBytes;
    this.payloadFilledBytes += this.queue.takeInto(
      request.payload,
      this.payloadFilledBytes,
      lengthBytes - this.payloadFilledBytes,
    );
    if (this.payloadFilledBytes < lengthBytes) return this.waitForBytes();
    assert(this.payloadFilledBytes === lengthBytes, "a payload is filled exactly");
    this.pendingWrite = undefined;
    this.state = "RECV_REQUEST_HEADER";
    this.dispatch(request, lengthBytes);
    return true;
  }

  private skipWritePayload(): boolean {
    this.skipLeftBytes -= this.queue.skip(this.skipLeftBytes);
    if (this.skipLeftBytes > 0) return this.waitForBytes();
    const request = this.pendingWrite;
    const errno = this.pendingWriteErrno;
    assert(request && errno, "a skipped payload belongs to a refused write");
    this.pendingWrite = undefined;
    this.state = "RECV_REQUEST_HEADER";
    this.transmission!.sendError(request, errno);
    return true;
  }

  private parseRequestHeader(): boolean {
    const header = this.queue.peek(NBD_REQUEST_HEADER_BYTES);
    const at = this.queue.peekOffsetBytes;
    if (header.readUInt32BE(at) !== NBD_REQUEST_MAGIC) {
      this.logger.warn("NBD request with a bad magic: disconnecting this client");
      this.finish("bad request magic");
      return false;
    }
    const commandFlags = header.readUInt16BE(at + 4);
    const command = header.readUInt16BE(at + 6);
    const offsetHigh = header.readUInt32BE(at + 16);
    const offsetLow = header.readUInt32BE(at + 20);
    const lengthBytes = header.readUInt32BE(at + 24);
    const request: PendingRequest = {
      command,
      commandFlags,
      cookieHigh: header.readUInt32BE(at + 8),
      cookieLow: header.readUInt32BE(at + 12),
      offsetBytes: offsetBytesOf(offsetHigh, offsetLow),
      lengthBytes,
      payload: undefined,
      isPayloadPooled: false,
      budgetBytes: 0,
      budgetHolds: 0,
      onReplyBuffer: (isTaken) => this.onReplyBuffer(request, isTaken),
    };
    const ticket = this.budgetTicket;
    this.budgetTicket = undefined;
    if (ticket !== undefined) {
      assert(
        ticket.isGranted && ticket.lengthBytes === lengthBytes,
        "the budget was granted for this header",
      );
      request.budgetBytes = lengthBytes;
      // Held until the request is dispatched; any other way out releases it below.
      request.budgetHolds = 1;
    }
    this.queue.skip(NBD_REQUEST_HEADER_BYTES);
    this.requestsReceived += 1;
    const transmission = this.transmission!;
    if (command === NBD_CMD_DISC) {
      this.finish("client sent NBD_CMD_DISC");
      return false;
    }
    let errno: Errno | undefined = this.isShuttingDown
      ? "ESHUTDOWN"
      : validateRequest(transmission.session, command, commandFlags, offsetHigh, offsetLow, lengthBytes);
    if (errno === undefined && this.isWriteRevoked && isModification(command)) errno = "EPERM";
    if (errno !== undefined) this.releaseBudgetHold(request);
    if (command === NBD_CMD_WRITE) {
      if (errno !== undefined) {
        if (lengthBytes > writeSkipFactorMax * this.requestLengthBytesMax) {
          this.die(`WRITE of ${lengthBytes} bytes, too large to skip`);
          return false;
        }
        this.pendingWrite = request;
        this.pendingWriteErrno = errno;
        this.skipLeftBytes = lengthBytes;
        this.state = "SKIP_WRITE_PAYLOAD";
        return true;
      }
      // A payload within one socket read is used where it is (not with in-place reads: that read's buffer
      // is reused). Any other is received into a shared buffer, which the file system writer thread writes
      // from without a copy of its own: with in-place reads most of a large payload is read straight into
      // it, otherwise it is copied once out of the socket's chunks.
      const view = this.receiveBuffer === undefined ? this.queue.takeIfContiguous(lengthBytes) : undefined;
      if (view !== undefined) {
        request.payload = view;
        this.dispatch(request, lengthBytes);
        return true;
      }
      // Devices do not keep `source` once write() settled (the BlockDevice contract), so it is recycled.
      request.payload = this.payloadPool.acquire(lengthBytes);
      request.isPayloadPooled = true;
      this.payloadFilledBytes = 0;
      this.pendingWrite = request;
      this.state = "RECV_WRITE_PAYLOAD";
      return true;
    }
    if (errno !== undefined) {
      transmission.sendError(request, errno);
      return true;
    }
    this.dispatch(request, command === NBD_CMD_READ ? lengthBytes : 0);
    return true;
  }

  private dispatch(request: PendingRequest, bufferBytes: number): void {
    // The hold taken with the header becomes the execution's hold, released in onRequestDone.
    this.inflightRequests += 1;
    this.inflightBytes += bufferBytes;
    if (request.command === NBD_CMD_READ) this.readBytesInProgress += request.lengthBytes;
    this.transmission!.execute(request).then(() => this.onRequestDone(request, bufferBytes));
  }

  private onRequestDone(request: PendingRequest, bufferBytes: number): void {
    if (request.isPayloadPooled) this.payloadPool.release(request.payload!);
    this.releaseBudgetHold(request);
    this.inflightRequests -= 1;
    this.inflightBytes -= bufferBytes;
    if (request.command === NBD_CMD_READ) this.readBytesInProgress -= request.lengthBytes;
    assert(
      this.inflightRequests >= 0 && this.inflightBytes >= 0 && this.readBytesInProgress >= 0,
      "in-flight accounting went negative",
    );
    if (this.state === "FINISHING") {
      this.endIfIdle();
      return;
    }
    this.pump();
  }

  /** A READ's reply buffer holds the request's budget until the socket is done with it. */
  private onReplyBuffer(request: PendingRequest, isTaken: boolean): void {
    if (request.budgetBytes === 0) return;
    if (isTaken) request.budgetHolds += 1;
    else this.releaseBudgetHold(request);
  }

  private releaseBudgetHold(request: PendingRequest): void {
    if (request.budgetBytes === 0) return;
    assert(request.budgetHolds > 0, "a budget hold is released once");
    request.budgetHolds -= 1;
    if (request.budgetHolds === 0) this.budget.release(this.clientKey, request.budgetBytes);
  }

  private canStartRequest(): boolean {
    if (this.socket.writableLength + this.readBytesInProgress >= replyQueueBytesMax) return false;
    if (this.inflightRequests >= this.inflightRequestsMax) return false;
    return this.inflightRequests === 0 || this.inflightBytes < inflightBytesMax;
  }

  private hasBytes(lengthBytes: number): boolean {
    if (this.queue.lengthBytes >= lengthBytes) return true;
    return this.waitForBytes();
  }

  /** Called when a state needs more input: after the client's EOF there will be none. */
  private waitForBytes(): boolean {
    if (this.isPeerEnded) {
      const isIdle = this.state === "RECV_REQUEST_HEADER" && this.queue.lengthBytes === 0;
      if (!isIdle) this.logger.debug({ state: this.state }, "NBD client closed in the middle of a message");
      this.finish("client closed the connection");
    }
    return false;
  }

  private applyHandshakeStep(step: HandshakeStep): boolean {
    if (step.kind !== "starttls") for (const reply of step.replies) this.sendReply(reply);
    switch (step.kind) {
      case "continue":
        this.state = "RECV_OPTION_HEADER";
        return true;
      case "transmission":
        this.transmission = new Transmission(step.session, this, { logger: this.logger, pool: this.pool });
        this.socket.setTimeout(0);
        this.state = "RECV_REQUEST_HEADER";
        this.logger.debug({ export: step.session.exportName }, "NBD transmission started");
        return true;
      case "close":
        this.logger.debug({ reason: step.reason }, "NBD handshake ended");
        this.finish(step.reason);
        return false;
      case "starttls":
        return this.startTls(step.replies);
    }
  }

  /** Soft end: parse nothing more, let in-flight requests reply, then end the socket. */
  private finish(reason: string): void {
    if (this.state === "FINISHING" || this.state === "DEAD") return;
    this.logger.debug({ reason }, "NBD connection finishing");
    this.state = "FINISHING";
    this.queue.clear();
    this.dropBudgetTicket();
    this.endIfIdle();
    this.updateReading();
  }

  private endIfIdle(): void {
    if (this.inflightRequests > 0 || this.isEnding || this.socket.destroyed) return;
    this.isEnding = true;
    // Destroy once our replies are flushed: we do not wait for the client's FIN.
    this.socket.end(() => this.socket.destroy());
    this.socket.resume();
  }

  /** Hard disconnect after a protocol violation or a DoS-sized request. */
  private die(reason: string): void {
    this.logger.warn({ reason }, "NBD client disconnected");
    this.destroy();
  }

  private updateReading(): void {
    const shouldRead =
      this.state === "FINISHING"
        ? this.isEnding
        : this.state !== "DEAD" && this.state !== "UPGRADING" && !this.isBlocked();
    if (shouldRead && this.isReadingPaused) {
      this.isReadingPaused = false;
      this.socket.resume();
    } else if (!shouldRead && !this.isReadingPaused) {
      this.isReadingPaused = true;
      this.socket.pause();
    }
  }

  private isBlocked(): boolean {
    if (this.state !== "RECV_REQUEST_HEADER") return false;
    return !this.canStartRequest() || (this.budgetTicket !== undefined && !this.budgetTicket.isGranted);
  }
}

function isModification(command: number): boolean {
  return command === NBD_CMD_WRITE || command === NBD_CMD_TRIM || command === NBD_CMD_WRITE_ZEROES;
}

function uncorkTick(connection: NbdConnection): void {
  connection.uncork();
}
