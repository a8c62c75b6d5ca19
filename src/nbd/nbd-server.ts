/**
 * NbdServer: the NBD face of blocksnap. It listens on Unix sockets, TCP (TCP_NODELAY) and inherited file
 * descriptors (systemd-style socket activation on fd 3), and serves the exports of an ExportSource, looked
 * up by name at NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME time. Each client is an NbdConnection;
 * the server only accepts, counts and shuts down.
 *
 * Bounds: connectionsMax clients in all, and connectionsPerClientMax per client, so that one client cannot
 * take every slot (more are closed at accept, with a log line). A client is a uid on Unix sockets (the
 * peer's SO_PEERCRED, read by peer-credentials.ts before the greeting is sent; while it is read the socket
 * counts against the global limit) and an IP address on TCP. A Unix peer whose uid cannot be read is
 * under the global limit only. Per connection the limits of nbd-limits.ts. READ and WRITE data in memory is
 * bounded across all connections by one InflightBudget (inflight-budget.ts), half of it per client. Shutdown: close() stops accepting, lets in-flight requests finish (answering requests
 * that arrive meanwhile with ESHUTDOWN), ends every socket, and destroys what is left after closeTimeoutMs.
 *
 * Not done: TLS, extended headers, exit-with-parent (the daemon watches its parent).
 */
import * as fs from "node:fs";
import * as net from "node:net";
import type { ExportSource } from "../block/export-source.js";
import { assert } from "../util/assert.js";
import type { Logger } from "../util/logger.js";
import { silentLogger } from "../util/logger.js";
import { type AccessPolicy, allowAll } from "./access-rules.js";
import { BufferPool } from "./buffer-pool.js";
import { reopenForInPlaceReads } from "./in-place-socket.js";
import { InflightBudget } from "./inflight-budget.js";
import type { NbdConnectionStats } from "./nbd-connection.js";
import { NbdConnection } from "./nbd-connection.js";
import {
  blockSizePreferredBytes,
  closeTimeoutMsDefault,
  connectionsMaxDefault,
  connectionsPerClientMaxDefault,
  inflightBudgetBytesDefault,
  inflightBudgetClientShare,
  inflightRequestsMaxDefault,
  receiveBufferBytes,
  replyBufferPoolBytesMax,
  replyBufferPooledBytesMin,
  replyQueueBytesMax,
  requestLengthBytesMaxDefault,
  writePayloadPoolBytesMax,
} from "./nbd-limits.js";
import { PeerUids } from "./peer-credentials.js";
import { type NbdTls, tlsOff } from "./tls.js";

export interface NbdServerOptions {
  readonly logger?: Logger; // default silentLogger
  readonly connectionsMax?: number; // default 256 (more are closed at accept, with a log line)
  /** Connections of one uid (Unix socket) or one address (TCP); default 64. */
  readonly connectionsPerClientMax?: number;
  /**
   * READ/WRITE data bytes in flight across all connections (a client may hold half); default 256 MiB. At
   * least twice requestLengthBytesMax, so that every request fits a client's half.
   */
  readonly inflightBudgetBytes?: number;
  readonly requestLengthBytesMax?: number; // default 32 MiB (advertised as max block size)
  readonly inflightRequestsMax?: number; // per connection, default 64; beyond it the server stops reading
  /** How long close() lets in-flight requests run before destroying the sockets; default 5000. */
  readonly closeTimeoutMs?: number;
  /** NBD_OPT_STARTTLS (tls.ts); default off. */
  readonly tls?: NbdTls;
  /** Who may use which export (access-rules.ts); default allowAll. After a change call reviewAccess(). */
  readonly access?: AccessPolicy;
}

export class NbdServer {
  private readonly source: ExportSource;
  private readonly logger: Logger;
  private readonly connectionsMax: number;
  private readonly connectionsPerClientMax: number;
  /** Open connections per client key (see clientKeyOf). */
  private readonly clientConnections = new Map<string, number>();
  /** Accepted sockets whose peer uid is being read; they count against connectionsMax. */
  private identifyingCount = 0;
  private acceptedTotal = 0;
  private inPlaceTotal = 0;
  private refusedTotal = 0;
  private readonly peerUids: PeerUids;
  private readonly budget: InflightBudget;
  private refusalLoggedAtMs = 0;
  private readonly requestLengthBytesMax: number;
  private readonly inflightRequestsMax: number;
  private readonly closeTimeoutMs: number;
  private readonly tls: NbdTls;
  private readonly access: AccessPolicy;
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();
  private readonly pool = new BufferPool({
    pooledBytesMax: replyBufferPoolBytesMax,
    bufferBytesMin: replyBufferPooledBytesMin,
  });
  private readonly payloadPool = new BufferPool({
    pooledBytesMax: writePayloadPoolBytesMax,
    bufferBytesMin: replyBufferPooledBytesMin,
    shared: true,
  });
  private closing: Promise<void> | undefined;

  constructor(source: ExportSource, options: NbdServerOptions = {}) {
    this.source = source;
    this.logger = options.logger ?? silentLogger;
    this.connectionsMax = options.connectionsMax ?? connectionsMaxDefault;
    this.connectionsPerClientMax = options.connectionsPerClientMax ?? connectionsPerClientMaxDefault;
    this.peerUids = new PeerUids({
      onHelperFailure: (message) =>
        this.logger.warn(
          { reason: message },
          "cannot read the uid of an NBD client on the Unix socket: only the global connection limit applies to it",
        ),
    });
    this.requestLengthBytesMax = options.requestLengthBytesMax ?? requestLengthBytesMaxDefault;
    this.inflightRequestsMax = options.inflightRequestsMax ?? inflightRequestsMaxDefault;
    this.closeTimeoutMs = options.closeTimeoutMs ?? closeTimeoutMsDefault;
    this.tls = options.tls ?? tlsOff;
    this.access = options.access ?? allowAll;
    const budgetBytes = options.inflightBudgetBytes ?? inflightBudgetBytesDefault;
    assert(
      Number.isSafeInteger(budgetBytes) &&
        Math.floor(budgetBytes * inflightBudgetClientShare) >= this.requestLengthBytesMax,
      "inflightBudgetBytes must give a client room for one request of the maximum size",
    );
    this.budget = new InflightBudget({
      bytesMax: budgetBytes,
      clientBytesMax: Math.floor(budgetBytes * inflightBudgetClientShare),
    });
    assert(Number.isSafeInteger(this.connectionsMax) && this.connectionsMax >= 1, "connectionsMax >= 1");
    assert(
      Number.isSafeInteger(this.connectionsPerClientMax) && this.connectionsPerClientMax >= 1,
      "connectionsPerClientMax >= 1",
    );
    assert(
      Number.isSafeInteger(this.requestLengthBytesMax) &&
        this.requestLengthBytesMax >= blockSizePreferredBytes &&
        this.requestLengthBytesMax <= 0xffff_ffff,
      "requestLengthBytesMax must be between the preferred block size and 2^32 - 1",
    );
    assert(Number.isSafeInteger(this.inflightRequestsMax) && this.inflightRequestsMax >= 1);
    assert(Number.isFinite(this.closeTimeoutMs) && this.closeTimeoutMs >= 0);
  }

  /** Listens on a Unix socket; a stale socket file at `path` is removed first. */
  async listenUnix(path: string): Promise<void> {
    removeStaleSocket(path);
    await this.listen({ path });
  }

  /** Listens on TCP; port 0 picks an ephemeral port. Returns the address actually bound. */
  async listenTcp(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = await this.listen({ host, port });
    const address = server.address() as net.AddressInfo;
    return { host: address.address, port: address.port };
  }

  /**
   * Serves an inherited listening socket (systemd socket activation passes it as fd 3). Returns its TCP
   * address, or null for a Unix socket, so the caller can apply the same rules as to --nbd-listen.
   */
  async listenFd(fd: number): Promise<{ host: string; port: number } | null> {
    const server = await this.listen({ fd });
    const address = server.address();
    if (address === null || typeof address === "string" || address.address === "") return null;
    return { host: address.address, port: address.port };
  }

  /**
   * Serves one connection accepted by another process (the supervisor passes it paused, unread), under
   * the same limits as our own listeners' connections.
   */
  serveSocket(socket: net.Socket): void {
    socket.setNoDelay(true);
    this.accept(socket);
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Connections that opened `exportName` (in transmission): who would see its contents change. */
  connectionsOn(exportName: string): number {
    let count = 0;
    for (const connection of this.connections) if (connection.stats.exportName === exportName) count++;
    return count;
  }

  /** Connections served since start (metrics). */
  get acceptedCount(): number {
    return this.acceptedTotal;
  }

  /** Connections served with in-place reads since start (in-place-socket.ts). */
  get inPlaceCount(): number {
    return this.inPlaceTotal;
  }

  /** Connections closed at accept by a limit (metrics). */
  get refusedCount(): number {
    return this.refusedTotal;
  }

  /** Bytes of the in-flight budget held now, and connections waiting for it. */
  get budgetStats(): { readonly inUseBytes: number; readonly waiting: number; readonly bytesMax: number } {
    return {
      inUseBytes: this.budget.inUseBytes,
      waiting: this.budget.waiterCount,
      bytesMax: this.budget.bytesMax,
    };
  }

  /** Per-connection counters (in-flight requests, queued reply bytes, paused reading) for tests and status. */
  connectionStats(): NbdConnectionStats[] {
    return [...this.connections].map((connection) => connection.stats);
  }

  /** The access policy changed: connections in transmission follow it (NbdConnection.reviewAccess()). */
  reviewAccess(): { closed: number; readOnly: number } {
    let closed = 0;
    let readOnly = 0;
    for (const connection of this.connections) {
      const outcome = connection.reviewAccess();
      if (outcome === "closed") closed += 1;
      if (outcome === "read-only") readOnly += 1;
    }
    return { closed, readOnly };
  }

  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    const listenersClosed = this.listeners.map(
      (server) => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    for (const connection of this.connections) connection.beginShutdown();
    const allClosed = () => Promise.all([...this.connections].map((connection) => connection.closed));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, this.closeTimeoutMs);
    });
    await Promise.race([allClosed(), timedOut]);
    clearTimeout(timer);
    if (this.connections.size > 0) {
      this.logger.warn(
        { connections: this.connections.size },
        "NBD requests still running at the close timeout; destroying their connections",
      );
      for (const connection of this.connections) connection.destroy();
      await allClosed();
    }
    await Promise.all(listenersClosed);
    this.peerUids.close();
  }

  private listen(options: net.ListenOptions | { readonly fd: number }): Promise<net.Server> {
    if (this.closing) return Promise.reject(new Error("NbdServer is closed"));
    const server = net.createServer(
      // Paused: nothing is read before the connection is set up (in-place reads move the socket's handle).
      { allowHalfOpen: true, noDelay: true, highWaterMark: replyQueueBytesMax, pauseOnConnect: true },
      (socket) => this.accept(socket),
    );
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(options, () => {
        server.off("error", reject);
        server.on("error", (error) => this.logger.error({ err: error }, "NBD listener error"));
        this.listeners.push(server);
        resolve(server);
      });
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.connections.size + this.identifyingCount >= this.connectionsMax) {
      this.refuse(socket, { connectionsMax: this.connectionsMax }, "too many connections");
      return;
    }
    if (socket.remoteAddress !== undefined) {
      this.admit(socket, `address ${unmappedAddress(socket.remoteAddress)}`);
      return;
    }
    // A Unix socket: nothing is read or sent until we know who is at the other end.
    socket.pause();
    socket.on("error", ignoreError);
    this.identifyingCount += 1;
    void this.peerUids.uidOf(socket).then((uid) => {
      this.identifyingCount -= 1;
      socket.off("error", ignoreError);
      if (this.closing || socket.destroyed) {
        socket.destroy();
        return;
      }
      this.admit(socket, uid === undefined ? undefined : `uid ${uid}`);
    });
  }

  /** Counts the socket against its client's limit and serves it; `clientKey` undefined: global only. */
  private admit(socket: net.Socket, clientKey: string | undefined): void {
    const clientCount = clientKey === undefined ? 0 : (this.clientConnections.get(clientKey) ?? 0);
    if (clientKey !== undefined && clientCount >= this.connectionsPerClientMax) {
      this.refuse(
        socket,
        { client: clientKey, connectionsPerClientMax: this.connectionsPerClientMax },
        "too many connections from this client",
      );
      return;
    }
    if (clientKey !== undefined) this.clientConnections.set(clientKey, clientCount + 1);
    // A connection that cannot upgrade to TLS reads in place (in-place-socket.ts).
    const receiveBuffer = this.tls.mode === "off" ? Buffer.allocUnsafeSlow(receiveBufferBytes) : undefined;
    const inPlace =
      receiveBuffer === undefined
        ? undefined
        : reopenForInPlaceReads(socket, receiveBuffer, replyQueueBytesMax);
    const served = inPlace?.socket ?? socket;
    const connection = new NbdConnection(served, {
      source: this.source,
      logger: this.logger,
      requestLengthBytesMax: this.requestLengthBytesMax,
      inflightRequestsMax: this.inflightRequestsMax,
      pool: this.pool,
      payloadPool: this.payloadPool,
      budget: this.budget,
      // Unix clients whose uid could not be read share one budget share.
      clientKey: clientKey ?? "uid unknown",
      tls: this.tls,
      access: this.access,
      ...(inPlace === undefined ? {} : { receiveBuffer }),
    });
    inPlace?.bind(connection);
    if (inPlace !== undefined) this.inPlaceTotal += 1;
    // Paused while its uid was read, by the supervisor, or at accept; the handlers are attached now.
    served.resume();
    this.connections.add(connection);
    this.acceptedTotal += 1;
    this.logger.debug(
      { connections: this.connections.size, client: clientKey, readsInPlace: inPlace !== undefined },
      "NBD client connected",
    );
    connection.closed.then(() => {
      this.connections.delete(connection);
      if (clientKey !== undefined) {
        const left = (this.clientConnections.get(clientKey) ?? 1) - 1;
        if (left > 0) this.clientConnections.set(clientKey, left);
        else this.clientConnections.delete(clientKey);
      }
      this.logger.debug({ connections: this.connections.size }, "NBD client disconnected");
    });
  }

  /** Closes a socket over a limit. A client that keeps trying costs one log line per second at most. */
  private refuse(socket: net.Socket, fields: Record<string, unknown>, reason: string): void {
    socket.destroy();
    this.refusedTotal += 1;
    const nowMs = Date.now();
    if (nowMs - this.refusalLoggedAtMs < refusalLogIntervalMs) return;
    this.refusalLoggedAtMs = nowMs;
    this.logger.warn(fields, `NBD connection refused: ${reason}`);
  }
}

const refusalLogIntervalMs = 1_000;

function ignoreError(): void {}

/** "::ffff:127.0.0.1" and "127.0.0.1" are one client. */
function unmappedAddress(address: string): string {
  return address.startsWith("::ffff:") && address.includes(".") ? address.slice(7) : address;
}

function removeStaleSocket(path: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(path);
  } catch {
    return;
  }
  // Only a socket is ours to remove; anything else at that path makes listen() fail with EADDRINUSE.
  if (stat.isSocket()) fs.unlinkSync(path);
}
