/**
 * A small HTTP proxy in front of an S3 endpoint for tests: forwards every request unchanged (the Host
 * header too, so SigV4 signatures stay valid) and, when told, answers some requests itself with
 * 503 SlowDown (throttling as S3 does it) or resets their connection. It counts what it saw and did, and
 * can call back after the Nth PUT of a chunk (to restart the server behind it mid-backup). When the
 * server behind it is down, the client's connection is reset, as a real load balancer would.
 */
import {
  createServer,
  request as httpRequest,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from "node:http";

export interface FaultPlan {
  /** Answer 503 SlowDown to request number n (1-based) when this says so. */
  readonly slowDown?: (requestNumber: number) => boolean;
  /** Reset the connection of request number n. */
  readonly reset?: (requestNumber: number) => boolean;
}

const slowDownBody =
  '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';

export class S3FaultProxy {
  readonly counts = { requests: 0, slowDowns: 0, resets: 0, chunkPuts: 0, upstreamFailures: 0 };
  plan: FaultPlan = {};
  /** Called once when chunk PUT number `afterChunkPuts` arrives. */
  onChunkPut: { afterChunkPuts: number; action: () => void } | null = null;
  private readonly server: Server;
  private readonly upstream: URL;

  private constructor(server: Server, upstream: URL) {
    this.server = server;
    this.upstream = upstream;
  }

  static async start(upstreamEndpoint: string): Promise<S3FaultProxy> {
    const upstream = new URL(upstreamEndpoint);
    let proxy: S3FaultProxy | null = null;
    const server = createServer((request, response) => proxy?.handle(request, response));
    proxy = new S3FaultProxy(server, upstream);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get endpoint(): string {
    const address = this.server.address();
    const port = typeof address === "object" && address !== null ? address.port : 0;
    return `http://127.0.0.1:${port}`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(request: IncomingMessage, response: ServerResponse): void {
    this.counts.requests += 1;
    const number = this.counts.requests;
    if (request.method === "PUT" && /\/chunks\//.test(request.url ?? "")) {
      this.counts.chunkPuts += 1;
      if (this.onChunkPut !== null && this.counts.chunkPuts === this.onChunkPut.afterChunkPuts) {
        const { action } = this.onChunkPut;
        this.onChunkPut = null;
        action();
      }
    }
    if (this.plan.reset?.(number)) {
      this.counts.resets += 1;
      request.socket.destroy();
      return;
    }
    if (this.plan.slowDown?.(number)) {
      this.counts.slowDowns += 1;
      request.resume();
      request.once("end", () => {
        response.writeHead(503, { "content-type": "application/xml" });
        response.end(slowDownBody);
      });
      return;
    }
    const forwarded = httpRequest(
      {
        host: this.upstream.hostname,
        port: this.upstream.port,
        method: request.method,
        path: request.url,
        headers: request.headers,
      },
      (upstreamResponse) => {
        response.writeHead(upstreamResponse.statusCode ?? 502, upstreamResponse.headers);
        upstreamResponse.pipe(response);
        upstreamResponse.once("error", () => request.socket.destroy());
      },
    );
    forwarded.once("error", () => {
      this.counts.upstreamFailures += 1;
      request.socket.destroy();
    });
    request.pipe(forwarded);
  }
}
