/**
 * The CLI's client of the control API: one HTTP request per call over the daemon's Unix socket, no
 * keep-alive (the process exits right after). Error bodies `{ "error": { "errno", "message" } }` become
 * CliErrors carrying the errno; a socket that is missing or refuses connections becomes a message that
 * says how to start the daemon; a connection the daemon closes without an answer (too many connections)
 * becomes "the daemon did not answer", and its 503 EAGAIN answer reads "daemon busy". Responses are
 * bounded (64 MiB: a CBT map of 2^21 blocks is 2 MiB).
 */
import { request as httpRequest } from "node:http";
import { CliError } from "./cli-error.js";

const responseBytesMax = 64 * 1024 * 1024;

export interface ControlClientOptions {
  readonly socketPath: string;
}

export interface BinaryResponse {
  readonly status: number;
  readonly contentType: string;
  readonly body: Buffer;
}

export class ControlClient {
  readonly socketPath: string;

  constructor(options: ControlClientOptions) {
    this.socketPath = options.socketPath;
  }

  get<T>(path: string): Promise<T> {
    return this.json<T>("GET", path);
  }

  post<T>(path: string, body?: unknown): Promise<T> {
    return this.json<T>("POST", path, body);
  }

  delete<T>(path: string): Promise<T> {
    return this.json<T>("DELETE", path);
  }

  /** For routes that answer with raw bytes (the CBT map). */
  async getBinary(path: string): Promise<Buffer> {
    const response = await this.send("GET", path, undefined);
    if (response.status >= 400) throw errorFromResponse(response);
    return response.body;
  }

  private async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const response = await this.send(method, path, body);
    if (response.status >= 400) throw errorFromResponse(response);
    try {
      return JSON.parse(response.body.toString("utf8")) as T;
    } catch {
      throw new CliError(`the daemon sent an unreadable answer to ${method} ${path}`, { errno: "EIO" });
    }
  }

  private send(method: string, path: string, body: unknown): Promise<BinaryResponse> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const headers: Record<string, string | number> = { Connection: "close" };
      if (payload !== undefined) {
        headers["Content-Type"] = "application/json";
        headers["Content-Length"] = payload.byteLength;
      }
      const request = httpRequest(
        { socketPath: this.socketPath, path, method, headers, agent: false },
        (response) => {
          const chunks: Buffer[] = [];
          let receivedBytes = 0;
          response.on("data", (chunk: Buffer) => {
            receivedBytes += chunk.byteLength;
            if (receivedBytes > responseBytesMax) {
              response.destroy(
                new CliError(`the daemon's answer to ${method} ${path} is too large`, { errno: "EFBIG" }),
              );
              return;
            }
            chunks.push(chunk);
          });
          response.once("error", (error: NodeJS.ErrnoException) => reject(this.connectionError(error)));
          response.once("end", () =>
            resolve({
              status: response.statusCode ?? 500,
              contentType: response.headers["content-type"] ?? "",
              body: Buffer.concat(chunks),
            }),
          );
        },
      );
      request.once("error", (error: NodeJS.ErrnoException) => reject(this.connectionError(error)));
      request.end(payload);
    });
  }

  private connectionError(error: NodeJS.ErrnoException): CliError {
    if (error instanceof CliError) return error;
    const code = error.code ?? "EIO";
    if (code === "ENOENT" || code === "ECONNREFUSED") {
      return new CliError(
        `the blocksnap daemon is not running (no daemon at ${this.socketPath}); start it with \`blocksnap serve\``,
        { errno: code, cause: error },
      );
    }
    if (code === "EPIPE" || code === "ECONNRESET" || code === "ECONNABORTED") {
      // The daemon closed the connection before answering: it refuses connections beyond its limit, and
      // cuts requests that did not arrive in time.
      return new CliError(
        `the daemon did not answer at ${this.socketPath} (connection closed: ${code}); it may be busy, try again`,
        { errno: "EAGAIN", cause: error },
      );
    }
    if (code === "EACCES" || code === "EPERM") {
      return new CliError(
        `permission denied on ${this.socketPath}: run as the daemon's user (the socket is mode 0600)`,
        { errno: code, cause: error },
      );
    }
    return new CliError(`cannot talk to the blocksnap daemon at ${this.socketPath}: ${error.message}`, {
      errno: code,
      cause: error,
    });
  }
}

function errorFromResponse(response: BinaryResponse): CliError {
  let errno = "EIO";
  let message = `the daemon answered HTTP ${response.status}`;
  try {
    const parsed = JSON.parse(response.body.toString("utf8")) as {
      error?: { errno?: unknown; message?: unknown };
    };
    if (typeof parsed.error?.errno === "string") errno = parsed.error.errno;
    if (typeof parsed.error?.message === "string") message = parsed.error.message;
  } catch {
    // Not our JSON: keep the status line as the message.
  }
  return new CliError(message, { errno });
}
