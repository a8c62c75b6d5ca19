/**
 * S3Store: an ObjectStore on an S3-compatible service (AWS S3, Ceph RGW, Swift's s3api, MinIO), for
 * repositories at `s3://BUCKET/PREFIX`. Path-style URLs (`ENDPOINT/BUCKET/KEY`), SigV4 (s3-sigv4.ts) over
 * Node's built-in fetch: no SDK, no runtime dependency.
 *
 * Requests: PUT is a single request (chunks are at most 64 MiB, manifests a few MiB, far below S3's 5 GiB
 * single-PUT limit; no multipart upload), with a signed SHA-256 of the payload (x-amz-content-sha256),
 * which the server checks, so it rejects a body damaged in flight. GET checks the body against the ETag
 * (the MD5 of a single-PUT object) before returning it, except when the caller checks the content itself
 * (chunks: the repository checks each against its content id, in a worker, so the MD5 would be a second
 * hash of every chunk on the event loop). HEAD,
 * ListObjectsV2 (paginated), DELETE (absent is fine).
 *
 * Made for a network: at most `parallel` requests in flight per store (a FIFO semaphore; waiting callers
 * queue), each attempt bounded by attemptTimeoutMs, and retries with exponential backoff and jitter on
 * 5xx, 429, SlowDown, RequestTimeout, checksum mismatches, connection errors and timeouts, up to
 * `attempts`. Other answers become one-line BlockErrors with an errno (403 → EACCES, NoSuchBucket → ENOENT).
 * Counters (requests, retries, bytes) are kept for benchmarks and tests.
 *
 * Not done: virtual-hosted-style URLs, multipart upload, server-side encryption headers, IMDS credentials.
 */
import { createHash } from "node:crypto";
import { BlockError, type Errno } from "../block/errors.js";
import { checkObjectKey, type ObjectInfo, type ObjectStore, StoreMissingError } from "./object-store.js";
import { loadS3Credentials, s3EndpointFrom, s3RegionFrom } from "./s3-credentials.js";
import { emptyPayloadSha256, type S3Credentials, signRequest, uriEncode } from "./s3-sigv4.js";

export const s3ParallelDefault = 8;
export const s3AttemptsDefault = 10;
const attemptTimeoutMsDefault = 120_000;
const backoffBaseMs = 100;
const backoffCapMs = 5_000;
const listPageKeys = 1000;
/** A billion objects: a bound on a listing that never ends (a server repeating its token). */
const listPagesMax = 1_000_000;
const errorBodyBytesMax = 64 << 10;

export interface S3Location {
  readonly bucket: string;
  /** "" or a `/`-terminated key prefix. */
  readonly prefix: string;
}

export interface S3StoreOptions extends S3Location {
  readonly endpoint: string;
  readonly region: string;
  /** Credentials, or a way to get them on first use (the environment and the shared file by default). */
  readonly credentials?: S3Credentials | (() => Promise<S3Credentials>);
  readonly parallel?: number;
  readonly attempts?: number;
  readonly attemptTimeoutMs?: number;
  readonly backoffBaseMs?: number;
}

export interface S3Stats {
  requests: number;
  /** Requests by kind: PUT, GET, HEAD, LIST, DELETE. */
  readonly byKind: Record<string, number>;
  retries: number;
  bytesSent: number;
  bytesReceived: number;
}

export interface S3Settings {
  readonly endpoint?: string | undefined;
  readonly region?: string | undefined;
  readonly parallel?: number | undefined;
}

/** The store of an `s3://` repository location; endpoint and region fall back to the AWS variables. */
export function openS3Store(location: string, settings: S3Settings = {}): S3Store {
  const region = s3RegionFrom(settings.region);
  return new S3Store({
    ...parseS3Location(location),
    region,
    endpoint: s3EndpointFrom(settings.endpoint, region),
    ...(settings.parallel === undefined ? {} : { parallel: settings.parallel }),
  });
}

/** Parses `s3://BUCKET[/PREFIX]`; the bucket follows S3's naming rules, the prefix the object key rules. */
export function parseS3Location(location: string): S3Location {
  const match = /^s3:\/\/([^/]+)(?:\/(.*))?$/.exec(location);
  if (match === null)
    throw new BlockError("EINVAL", `Invalid S3 repository ${JSON.stringify(location)}: s3://BUCKET/PREFIX`);
  const bucket = match[1] ?? "";
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket) || bucket.includes(".."))
    throw new BlockError(
      "EINVAL",
      `Invalid S3 bucket name ${JSON.stringify(bucket)}: 3 to 63 of a-z 0-9 . - (S3's naming rules)`,
    );
  const prefix = (match[2] ?? "").replace(/^\/+|\/+$/g, "");
  if (prefix !== "") checkObjectKey(prefix);
  return { bucket, prefix: prefix === "" ? "" : `${prefix}/` };
}

export function formatS3Location(location: S3Location): string {
  return `s3://${location.bucket}/${location.prefix}`;
}

interface S3Answer {
  readonly status: number;
  readonly headers: Headers;
  readonly body: Buffer;
}

interface S3ErrorBody {
  readonly code: string;
  readonly message: string;
}

class RetryableError extends Error {}

/** A FIFO counting semaphore. */
class Slots {
  private free: number;
  private readonly waiting: (() => void)[] = [];

  constructor(count: number) {
    this.free = count;
  }

  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free -= 1;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  release(): void {
    const next = this.waiting.shift();
    if (next !== undefined) next();
    else this.free += 1;
  }
}

export class S3Store implements ObjectStore {
  readonly location: string;
  readonly bucket: string;
  readonly prefix: string;
  readonly endpoint: string;
  readonly region: string;
  readonly inFlightHint: number;
  readonly stats: S3Stats = { requests: 0, byKind: {}, retries: 0, bytesSent: 0, bytesReceived: 0 };

  private readonly slots: Slots;
  private readonly attempts: number;
  private readonly attemptTimeoutMs: number;
  private readonly backoffBaseMs: number;
  private readonly credentialSource: S3Credentials | (() => Promise<S3Credentials>);
  private credentials: Promise<S3Credentials> | null = null;

  constructor(options: S3StoreOptions) {
    const parallel = options.parallel ?? s3ParallelDefault;
    const attempts = options.attempts ?? s3AttemptsDefault;
    if (!Number.isSafeInteger(parallel) || parallel < 1 || parallel > 1024)
      throw new BlockError("EINVAL", `S3 parallel requests ${parallel}: from 1 to 1024`);
    if (!Number.isSafeInteger(attempts) || attempts < 1 || attempts > 100)
      throw new BlockError("EINVAL", `S3 attempts ${attempts}: from 1 to 100`);
    this.bucket = options.bucket;
    this.prefix = options.prefix;
    this.endpoint = options.endpoint.replace(/\/+$/, "");
    this.region = options.region;
    this.location = formatS3Location(options);
    this.slots = new Slots(parallel);
    this.inFlightHint = parallel;
    this.attempts = attempts;
    this.attemptTimeoutMs = options.attemptTimeoutMs ?? attemptTimeoutMsDefault;
    this.backoffBaseMs = options.backoffBaseMs ?? backoffBaseMs;
    this.credentialSource = options.credentials ?? (() => loadS3Credentials());
  }

  /** Identifies the repository for local caches: endpoint, bucket and prefix. */
  get cacheIdentity(): string {
    return `${this.endpoint}/${this.bucket}/${this.prefix}`;
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    checkObjectKey(key);
    // A chunk slot's shared memory (chunk-slots.ts) cannot be a request body: copied into a Buffer.
    const body =
      data.buffer instanceof SharedArrayBuffer
        ? Buffer.from(data)
        : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    // The signed SHA-256 of the body is the integrity check (S3 and Swift's s3api verify it); a
    // Content-MD5 as well would cost a second hash of every chunk on the event loop.
    const headers = { "content-type": "application/octet-stream" };
    const payloadSha256 = createHash("sha256").update(body).digest("hex");
    const answer = await this.send("PUT", this.objectPath(key), { headers, body, payloadSha256 });
    if (answer.status !== 200) throw this.failure("PUT", key, answer);
  }

  async get(key: string, options: { readonly contentChecked?: boolean } = {}): Promise<Uint8Array> {
    checkObjectKey(key);
    const answer = await this.send(
      "GET",
      this.objectPath(key),
      options.contentChecked ? {} : { check: (response) => checkEtag(response, `${this.location}${key}`) },
    );
    if (answer.status === 200) return answer.body;
    if (answer.status === 404 && parseErrorBody(answer.body)?.code !== "NoSuchBucket")
      throw new BlockError("ENOENT", `Object ${key} not found in ${this.location}`);
    throw this.failure("GET", key, answer);
  }

  async head(key: string): Promise<ObjectInfo | null> {
    checkObjectKey(key);
    const answer = await this.send("HEAD", this.objectPath(key));
    // A HEAD answer has no body: a missing bucket looks like a missing key (the next list or get says).
    if (answer.status === 404) return null;
    if (answer.status !== 200) throw this.failure("HEAD", key, answer);
    return {
      key,
      sizeBytes: Number(answer.headers.get("content-length") ?? 0),
      modifiedMs: Date.parse(answer.headers.get("last-modified") ?? "") || 0,
    };
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    let continuation: string | null = null;
    for (let page = 0; page < listPagesMax; page++) {
      const query: Record<string, string> = {
        "list-type": "2",
        prefix: `${this.prefix}${prefix}`,
        "max-keys": String(listPageKeys),
      };
      if (continuation !== null) query["continuation-token"] = continuation;
      const answer = await this.send("GET", `/${this.bucket}`, { query });
      if (answer.status !== 200) throw this.failure("LIST", prefix, answer);
      const xml = answer.body.toString("utf8");
      for (const contents of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
        const part = contents[1] ?? "";
        const fullKey = xmlText(part, "Key");
        if (fullKey === null || !fullKey.startsWith(this.prefix)) continue;
        yield {
          key: fullKey.slice(this.prefix.length),
          sizeBytes: Number(xmlText(part, "Size") ?? 0),
          modifiedMs: Date.parse(xmlText(part, "LastModified") ?? "") || 0,
        };
      }
      const truncated = xmlText(xml, "IsTruncated") === "true";
      continuation = xmlText(xml, "NextContinuationToken");
      if (!truncated) return;
      if (continuation === null)
        throw new BlockError("EIO", `S3 listing of ${this.location}${prefix} is truncated without a token`);
    }
    throw new BlockError(
      "EIO",
      `S3 listing of ${this.location}${prefix} did not end after ${listPagesMax} pages`,
    );
  }

  async delete(key: string): Promise<void> {
    checkObjectKey(key);
    const answer = await this.send("DELETE", this.objectPath(key));
    if (answer.status === 204 || answer.status === 200) return;
    if (answer.status === 404 && parseErrorBody(answer.body)?.code !== "NoSuchBucket") return;
    throw this.failure("DELETE", key, answer);
  }

  /** Creates the bucket (tests, benchmarks, first setup); an existing bucket of the same owner is fine. */
  async createBucket(): Promise<void> {
    const answer = await this.send("PUT", `/${this.bucket}`);
    if (answer.status === 200) return;
    if (answer.status === 409 && parseErrorBody(answer.body)?.code === "BucketAlreadyOwnedByYou") return;
    throw this.failure("CREATE BUCKET", "", answer);
  }

  private objectPath(key: string): string {
    return `/${this.bucket}/${uriEncode(`${this.prefix}${key}`, true)}`;
  }

  private async credentialsOnce(): Promise<S3Credentials> {
    if (this.credentials === null) {
      const source = this.credentialSource;
      this.credentials = typeof source === "function" ? source() : Promise.resolve(source);
      // A failed load (no file yet) is retried by the next request rather than remembered.
      this.credentials.catch(() => {
        this.credentials = null;
      });
    }
    return await this.credentials;
  }

  /** One request with retries; answers that are not retryable are returned for the caller to judge. */
  private async send(
    method: string,
    path: string,
    options: {
      headers?: Record<string, string>;
      body?: Buffer;
      payloadSha256?: string;
      query?: Record<string, string>;
      check?: (answer: S3Answer) => void;
    } = {},
  ): Promise<S3Answer> {
    const credentials = await this.credentialsOnce();
    const url = new URL(`${this.endpoint}${path}`);
    for (const [name, value] of Object.entries(options.query ?? {})) url.searchParams.set(name, value);
    let lastProblem = "";
    for (let attempt = 1; attempt <= this.attempts; attempt++) {
      if (attempt > 1) {
        this.stats.retries += 1;
        await sleep(this.backoffMs(attempt - 1));
      }
      await this.slots.acquire();
      try {
        this.stats.requests += 1;
        const kind = options.query?.["list-type"] === undefined ? method : "LIST";
        this.stats.byKind[kind] = (this.stats.byKind[kind] ?? 0) + 1;
        const headers = signRequest({
          method,
          url,
          headers: options.headers ?? {},
          payloadSha256: options.payloadSha256 ?? emptyPayloadSha256,
          credentials,
          region: this.region,
        });
        const response = await fetch(url, {
          method,
          headers,
          ...(options.body === undefined ? {} : { body: options.body }),
          signal: AbortSignal.timeout(this.attemptTimeoutMs),
        });
        const body = method === "HEAD" ? Buffer.alloc(0) : Buffer.from(await response.arrayBuffer());
        this.stats.bytesSent += options.body?.length ?? 0;
        this.stats.bytesReceived += body.length;
        const answer: S3Answer = { status: response.status, headers: response.headers, body };
        const retryReason = retryableAnswer(answer);
        if (retryReason !== null) {
          lastProblem = retryReason;
          continue;
        }
        if (answer.status >= 200 && answer.status < 300) options.check?.(answer);
        return answer;
      } catch (error) {
        if (error instanceof BlockError) throw error;
        lastProblem = networkProblem(error);
      } finally {
        this.slots.release();
      }
    }
    throw new BlockError(
      "EIO",
      `S3 ${method} ${url.pathname} at ${this.endpoint} failed after ${this.attempts} attempt(s): ${lastProblem}`,
    );
  }

  /** Exponential backoff with equal jitter: half the step fixed, half random. */
  private backoffMs(retry: number): number {
    const step = Math.min(backoffCapMs, this.backoffBaseMs * 2 ** (retry - 1));
    return step / 2 + Math.random() * (step / 2);
  }

  private failure(operation: string, key: string, answer: S3Answer): BlockError {
    const parsed = parseErrorBody(answer.body);
    const code = parsed?.code ?? `HTTP ${answer.status}`;
    const what = `${this.location}${key}`;
    let errno: Errno = "EIO";
    let message = `S3 ${operation} ${what}: ${code}${parsed?.message ? ` (${parsed.message})` : ""}`;
    if (code === "NoSuchBucket")
      return new StoreMissingError(`S3 bucket ${this.bucket} does not exist at ${this.endpoint}`);
    if (
      code === "InvalidAccessKeyId" ||
      code === "SignatureDoesNotMatch" ||
      code === "InvalidToken" ||
      code === "ExpiredToken"
    ) {
      errno = "EACCES";
      message = `S3 rejected the credentials for ${this.location} at ${this.endpoint} (${code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile`;
    } else if (answer.status === 403) {
      errno = "EACCES";
      message = `S3 denied ${operation} ${what} (${code}): check the credentials and their permissions on bucket ${this.bucket}`;
    } else if (code === "RequestTimeTooSkewed") {
      errno = "EACCES";
      message = `S3 refused the request: this host's clock is off (${code})`;
    } else if (answer.status === 404) {
      errno = "ENOENT";
    } else if (code === "EntityTooLarge" || code === "QuotaExceeded") {
      errno = "ENOSPC";
    }
    return new BlockError(errno, message);
  }
}

/** Why an answer should be retried, or null. */
function retryableAnswer(answer: S3Answer): string | null {
  const parsed = answer.status >= 300 ? parseErrorBody(answer.body) : null;
  const code = parsed?.code ?? "";
  if (answer.status >= 500 || answer.status === 429) return `${answer.status} ${code}`.trim();
  if (["SlowDown", "RequestTimeout", "BadDigest", "XAmzContentSHA256Mismatch", "Throttling"].includes(code))
    return `${answer.status} ${code}`;
  return null;
}

/** A GET body that does not match its MD5 ETag is retried (damaged in flight), and then an EIO. */
function checkEtag(answer: S3Answer, what: string): void {
  const etag = answer.headers.get("etag")?.replace(/"/g, "") ?? "";
  if (!/^[0-9a-f]{32}$/.test(etag)) return;
  const md5 = createHash("md5").update(answer.body).digest("hex");
  if (md5 !== etag) throw new RetryableError(`${what}: body MD5 ${md5} differs from ETag ${etag}`);
}

function networkProblem(error: unknown): string {
  if (error instanceof RetryableError) return error.message;
  if (error instanceof Error) {
    if (error.name === "TimeoutError") return "timed out";
    const cause = (error as { cause?: { code?: string; message?: string } }).cause;
    if (cause?.code !== undefined) return `${cause.code}${cause.message ? ` (${cause.message})` : ""}`;
    return error.message;
  }
  return String(error);
}

function parseErrorBody(body: Buffer): S3ErrorBody | null {
  if (body.length === 0 || body.length > errorBodyBytesMax) return null;
  const text = body.toString("utf8");
  const code = xmlText(text, "Code");
  if (code === null) return null;
  return { code, message: xmlText(text, "Message") ?? "" };
}

function xmlText(xml: string, tag: string): string | null {
  const match = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(xml);
  if (match === null) return null;
  return (match[1] ?? "")
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&#(\d+);/g, (_all, code: string) => String.fromCharCode(Number(code)))
    .replace(/&amp;/g, "&");
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
