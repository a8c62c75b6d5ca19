/**
 * The control API's HTTP plumbing on a Unix socket (mode 0600, or 0660 to `--socket-group`; like Docker's
 * engine API): body collection
 * with a size bound, JSON parsing, routing (control-routes.ts), and errors as
 * `{ "error": { "errno", "message" } }` with the status of http-status.ts.
 *
 * Bounds, so that no client can hold the API: request bodies ≤ 1 MiB (413 beyond); the headers must arrive
 * within headersTimeoutMs and the whole request (headers and body) within requestTimeoutMs, else Node
 * answers 408 and closes (a long poll is not cut: the timer stops once its request is received); at most
 * requestsInFlightMax requests at once (long polls count), beyond which the answer is 503 EAGAIN at once;
 * at most controlConnectionsMax connections (Node drops the ones beyond). close() waits a bounded time for
 * in-flight requests before cutting connections. Logging: one debug line per request, errors at warn/error.
 *
 * Broken invariants (AssertionError) thrown by the engine are answered with 500 EIO and then end the
 * daemon (util/broken-invariant.ts), instead of serving a wrong snapshot.
 */
import { rm } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { BlockError, toBlockError } from "../block/errors.js";
import { crashOnBrokenInvariant, isBrokenInvariant } from "../util/broken-invariant.js";
import type { Logger } from "../util/logger.js";
import { apiRequestBodyBytesMax } from "./api-limits.js";
import type { ApiErrorBody } from "./api-types.js";
import { type ControlContext, matchRoute, type RouteResult, type StreamedBody } from "./control-routes.js";
import { httpStatusForErrno } from "./http-status.js";
import { listenRestricted, type SocketAccess } from "./socket-access.js";
import { removeStaleSocket } from "./stale-socket.js";

export const requestBodyBytesMax = apiRequestBodyBytesMax;
export const requestsInFlightMax = 64;
export const controlConnectionsMax = 256;
export const headersTimeoutMs = 10_000;
export const requestTimeoutMs = 20_000;
const timeoutCheckIntervalMs = 1000;
const closeGraceMs = 5000;

export interface ControlServerOptions {
  readonly socketPath: string;
  readonly context: ControlContext;
  readonly logger: Logger;
  /** Default: the daemon's user only (0600). */
  readonly access?: SocketAccess;
}

export class ControlServer {
  readonly socketPath: string;
  private readonly server: Server;
  private readonly context: ControlContext;
  private readonly logger: Logger;
  private inflightRequests = 0;
  private readonly idleWaiters: (() => void)[] = [];
  /** False when another process (the supervisor) listens and passes connections: its socket file. */
  private ownsSocketFile = true;
  private closing: Promise<void> | null = null;

  private constructor(options: ControlServerOptions) {
    this.socketPath = options.socketPath;
    this.context = options.context;
    this.logger = options.logger;
    this.server = createServer(
      {
        headersTimeout: headersTimeoutMs,
        requestTimeout: requestTimeoutMs,
        connectionsCheckingInterval: timeoutCheckIntervalMs,
      },
      (request, response) => this.onRequest(request, response),
    );
    // `Expect: 100-continue` (curl sends it with large bodies): a body over the limit is refused before
    // the client sends it, so the 413 reaches it instead of a broken pipe.
    this.server.on("checkContinue", (request: IncomingMessage, response: ServerResponse) => {
      if (!(declaredBodyBytes(request) > requestBodyBytesMax)) response.writeContinue();
      this.onRequest(request, response);
    });
    this.server.maxConnections = controlConnectionsMax;
  }

  private onRequest(request: IncomingMessage, response: ServerResponse): void {
    // In flight until the answer is flushed (or the connection died): close() must not cut an answer
    // that is still in the socket's buffer.
    this.inflightRequests++;
    response.once("close", () => {
      this.inflightRequests--;
      if (this.inflightRequests === 0) for (const waiter of this.idleWaiters.splice(0)) waiter();
    });
    if (this.inflightRequests > requestsInFlightMax) {
      this.refuseBusy(request, response);
      return;
    }
    void this.handle(request, response);
  }

  /** Answers 503 without reading the body, and closes the connection. */
  private refuseBusy(request: IncomingMessage, response: ServerResponse): void {
    this.logger.warn({ requestsInFlightMax }, "control API busy: request refused");
    response.setHeader("Connection", "close");
    sendJson(
      response,
      503,
      errorBody("EAGAIN", `daemon busy: ${requestsInFlightMax} requests in flight; try again`),
    );
    request.resume();
  }

  /**
   * Listens on `socketPath`, replacing only a stale socket (stale-socket.ts). A socket on which something
   * still answers is never replaced (EBUSY): with `--socket`, two state directories could name the same
   * socket; a file that is not a socket is never removed (EEXIST).
   */
  static async listen(options: ControlServerOptions): Promise<ControlServer> {
    const controlServer = new ControlServer(options);
    await removeStaleSocket(options.socketPath);
    await listenRestricted(
      options.socketPath,
      options.access ?? { group: null },
      () =>
        new Promise<void>((resolve, reject) => {
          controlServer.server.once("error", reject);
          controlServer.server.once("listening", () => {
            controlServer.server.off("error", reject);
            resolve();
          });
          controlServer.server.listen(options.socketPath);
        }),
    );
    return controlServer;
  }

  /**
   * Serves connections another process accepted (the supervisor, src/supervisor/): no listener here, and
   * the socket file at `socketPath` stays the other process's.
   */
  static attach(options: ControlServerOptions): ControlServer {
    const controlServer = new ControlServer(options);
    controlServer.ownsSocketFile = false;
    return controlServer;
  }

  /** One connection accepted elsewhere (paused: the supervisor read nothing from it). */
  acceptConnection(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    this.server.emit("connection", socket);
    socket.resume();
  }

  /**
   * Stops accepting, lets in-flight requests finish (long polls were ended by the shutdown signal) for at
   * most a few seconds, then closes every connection and removes the socket file.
   */
  close(): Promise<void> {
    this.closing ??= this.closeOnce();
    return this.closing;
  }

  private async closeOnce(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeIdleConnections();
    if (this.inflightRequests > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        new Promise<void>((resolve) => this.idleWaiters.push(resolve)),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, closeGraceMs);
        }),
      ]);
      clearTimeout(timer);
      if (this.inflightRequests > 0) {
        this.logger.warn(
          { inflightRequests: this.inflightRequests },
          "closing control connections with requests in flight",
        );
      }
    }
    this.server.closeAllConnections();
    if (this.ownsSocketFile) {
      await closed;
      await rm(this.socketPath, { force: true });
    }
  }

  /**
   * Everything a request does runs inside this one try: the target's parse, the body, the route. A
   * hostile request can earn an error answer, never an exception outside the request.
   */
  private async handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const method = request.method ?? "GET";
    try {
      const url = parseTarget(request.url);
      this.logger.debug({ method, path: url.pathname }, "control request");
      const body = await readJsonBody(request);
      const match = matchRoute(method, url.pathname);
      if (match.kind === "not-found") {
        throw new BlockError("ENOENT", `no such API route: ${method} ${url.pathname}`);
      }
      if (match.kind === "method-not-allowed") {
        response.setHeader("Allow", match.allowed.join(", "));
        throw new BlockError("ENOTSUP", `${method} is not allowed on ${url.pathname}`);
      }
      const query: Record<string, string> = {};
      for (const [key, value] of url.searchParams) query[key] = value;
      const result = await match.route.handler(this.context, { params: match.params, query, body });
      if ("streamed" in result) {
        await this.sendStreamed(response, result.status, result.streamed);
        return;
      }
      sendResult(response, result);
    } catch (error) {
      try {
        this.sendError(request, response, error);
      } catch (sendFailure) {
        // Answering failed too (the connection is gone): drop it, the request is over.
        this.logger.warn({ err: (sendFailure as Error)?.message }, "control answer failed");
        response.destroy();
      }
    }
  }

  /**
   * Writes a streamed answer piece by piece, waiting for 'drain' whenever the socket's buffer is full, so a
   * slow reader holds one piece of it, not the whole answer. A client that goes away ends the loop.
   */
  private async sendStreamed(response: ServerResponse, status: number, body: StreamedBody): Promise<void> {
    response.writeHead(status, { "Content-Type": body.contentType, "Content-Length": body.lengthBytes });
    for (const piece of body.pieces) {
      if (response.destroyed) return;
      if (response.write(piece)) continue;
      const drained = await new Promise<boolean>((resolve) => {
        const onDrain = () => settle(true);
        const onClose = () => settle(false);
        const settle = (isDrained: boolean) => {
          response.off("drain", onDrain);
          response.off("close", onClose);
          resolve(isDrained);
        };
        response.on("drain", onDrain);
        response.on("close", onClose);
      });
      if (!drained) return;
    }
    response.end();
  }

  private sendError(request: IncomingMessage, response: ServerResponse, error: unknown): void {
    if (isBrokenInvariant(error)) {
      crashOnBrokenInvariant(
        error,
        this.logger,
        { method: request.method, url: request.url },
        "a control request",
      );
      sendJson(response, 500, errorBody("EIO", `internal error: ${error.message}`));
      return;
    }
    const blockError =
      error instanceof BlockError || typeof (error as { code?: unknown } | null)?.code === "string"
        ? toBlockError(error, "control request")
        : null;
    if (blockError === null) {
      this.logger.error(
        { err: (error as Error)?.message, stack: (error as Error)?.stack },
        "control request failed",
      );
      sendJson(
        response,
        500,
        errorBody("EIO", `internal error: ${(error as Error)?.message ?? String(error)}`),
      );
      return;
    }
    const status = blockError instanceof RequestBodyTooLarge ? 413 : httpStatusForErrno(blockError.errno);
    if (status >= 500) {
      this.logger.warn(
        { method: request.method, url: request.url, errno: blockError.errno, err: blockError.message },
        "control request failed",
      );
    }
    if (status === 413) response.setHeader("Connection", "close");
    sendJson(response, status, errorBody(blockError.errno, blockError.message));
  }
}

/**
 * The request target as a URL. Only origin-form (`/path?query`) is accepted: an absolute URL, `*` or a
 * target that does not parse (`//[`) is a bad request (EINVAL), never a throw outside the handler.
 */
function parseTarget(target: string | undefined): URL {
  if (target === undefined || !target.startsWith("/") || target.startsWith("//")) {
    throw new BlockError("EINVAL", "the request target must be a path starting with a single /");
  }
  try {
    return new URL(target, "http://blocksnap");
  } catch {
    throw new BlockError("EINVAL", "the request target is not a valid path");
  }
}

function errorBody(errno: string, message: string): ApiErrorBody {
  return { error: { errno, message } };
}

function sendResult(
  response: ServerResponse,
  result: Exclude<RouteResult, { streamed: StreamedBody }>,
): void {
  if ("binary" in result) {
    response.writeHead(result.status, {
      "Content-Type": "application/octet-stream",
      "Content-Length": result.binary.byteLength,
    });
    response.end(result.binary);
    return;
  }
  sendJson(response, result.status, result.json);
}

function sendJson(response: ServerResponse, status: number, value: unknown): void {
  if (response.headersSent) {
    response.destroy();
    return;
  }
  const text = `${JSON.stringify(value)}\n`;
  response.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
  });
  response.end(text);
}

function declaredBodyBytes(request: IncomingMessage): number {
  return Number(request.headers["content-length"] ?? 0);
}

/** A request body over requestBodyBytesMax: the one EFBIG answered 413 (a too large argument is 400). */
class RequestBodyTooLarge extends BlockError {
  constructor() {
    super("EFBIG", `request body larger than ${requestBodyBytesMax} bytes`);
  }
}

/** Collects at most requestBodyBytesMax bytes and parses them as JSON; an empty body is undefined. */
function readJsonBody(request: IncomingMessage): Promise<unknown> {
  const tooLarge = (): BlockError => new RequestBodyTooLarge();
  if (declaredBodyBytes(request) > requestBodyBytesMax) {
    request.resume();
    return Promise.reject(tooLarge());
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let receivedBytes = 0;
    const onData = (chunk: Buffer): void => {
      receivedBytes += chunk.byteLength;
      if (receivedBytes <= requestBodyBytesMax) {
        chunks.push(chunk);
        return;
      }
      // Discard the rest without destroying the socket: the 413 answer must still reach the client.
      request.off("data", onData);
      request.off("end", onEnd);
      request.resume();
      reject(tooLarge());
    };
    const onEnd = (): void => {
      request.off("error", reject);
      if (receivedBytes === 0) {
        resolve(undefined);
        return;
      }
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString("utf8")));
      } catch (error) {
        reject(new BlockError("EINVAL", `request body is not valid JSON: ${(error as Error).message}`));
      }
    };
    request.on("data", onData);
    request.once("end", onEnd);
    request.once("error", reject);
  });
}
