/**
 * The opt-in TCP listener for Prometheus (`serve --metrics-listen HOST:PORT`): it answers GET (and HEAD)
 * /metrics with the same text as the control socket's GET /metrics, 405 for another method on that path,
 * and 404 for every other path: nothing else of the control API is reachable on it.
 *
 * It is unauthenticated and unencrypted (like node_exporter's default): it reveals device names, snapshot
 * ids and I/O volumes to whoever can reach the port, so bind it to loopback or a monitoring network.
 * Bounds: headers within headersTimeoutMs, a whole request within requestTimeoutMs, at most
 * connectionsMax connections; request bodies are discarded unread.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { BlockError, toBlockError } from "../block/errors.js";
import type { Logger } from "../util/logger.js";
import { exposition } from "./text-format.js";

const connectionsMax = 16;
const headersTimeoutMs = 10_000;
const requestTimeoutMs = 20_000;

export class MetricsListener {
  readonly host: string;
  readonly port: number;
  private readonly server: Server;

  private constructor(server: Server, address: AddressInfo) {
    this.server = server;
    this.host = address.address;
    this.port = address.port;
  }

  /** Listens on `host:port` (port 0: any free port). EBUSY when the address is in use. */
  static async listen(
    address: { readonly host: string; readonly port: number },
    render: () => string,
    logger: Logger,
  ): Promise<MetricsListener> {
    const server = createServer(
      { headersTimeout: headersTimeoutMs, requestTimeout: requestTimeoutMs },
      (request, response) => answer(request, response, render, logger),
    );
    server.maxConnections = connectionsMax;
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(address.port, address.host, () => {
          server.off("error", reject);
          resolve();
        });
      });
    } catch (error) {
      const code = (error as { code?: unknown } | null)?.code;
      if (code === "EADDRINUSE") {
        throw new BlockError(
          "EBUSY",
          `metrics address ${address.host}:${address.port} is already in use (choose another with --metrics-listen HOST:PORT)`,
          { cause: error },
        );
      }
      throw toBlockError(error, `cannot listen for metrics on ${address.host}:${address.port}`);
    }
    return new MetricsListener(server, server.address() as AddressInfo);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

function answer(
  request: IncomingMessage,
  response: ServerResponse,
  render: () => string,
  logger: Logger,
): void {
  request.resume();
  const path = (request.url ?? "").split("?")[0];
  if (path !== "/metrics") {
    sendText(response, 404, "not found: this listener serves only GET /metrics\n");
    return;
  }
  if (request.method !== "GET" && request.method !== "HEAD") {
    response.setHeader("Allow", "GET, HEAD");
    sendText(response, 405, "only GET and HEAD are allowed on /metrics\n");
    return;
  }
  let text: string;
  try {
    text = render();
  } catch (error) {
    logger.error({ err: (error as Error)?.message }, "metrics scrape failed");
    sendText(response, 500, "metrics scrape failed\n");
    return;
  }
  response.writeHead(200, {
    "Content-Type": exposition.contentType,
    "Content-Length": Buffer.byteLength(text),
  });
  response.end(request.method === "HEAD" ? undefined : text);
}

function sendText(response: ServerResponse, status: number, text: string): void {
  response.writeHead(status, {
    "Content-Type": "text/plain; charset=utf-8",
    "Content-Length": Buffer.byteLength(text),
  });
  response.end(text);
}
