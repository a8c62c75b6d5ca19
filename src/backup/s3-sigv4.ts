/**
 * AWS Signature Version 4 for S3 requests in the header form (Authorization: AWS4-HMAC-SHA256 …), enough
 * for the requests the S3 store makes: path-style URLs, a few signed headers, a hex SHA-256 of the
 * payload (or UNSIGNED-PAYLOAD). No presigned URLs, no chunked (streaming) signatures.
 *
 * S3 differs from the other services in two details honoured here: the path is URI-encoded once (not
 * twice), and x-amz-content-sha256 is a signed header on every request. The signing key depends only on
 * the secret, day, region and service, so it is cached per day.
 */
import { createHash, createHmac } from "node:crypto";

export interface S3Credentials {
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  readonly sessionToken?: string | undefined;
}

export const emptyPayloadSha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
export const unsignedPayload = "UNSIGNED-PAYLOAD";

export interface SignInput {
  readonly method: string;
  readonly url: URL;
  /** Headers to send besides host and the x-amz-* ones this adds; all of them are signed. */
  readonly headers: Readonly<Record<string, string>>;
  readonly payloadSha256: string;
  readonly credentials: S3Credentials;
  readonly region: string;
  readonly service?: string;
  readonly now?: Date;
}

/** RFC 3986 encoding as SigV4 wants it: everything but A-Z a-z 0-9 - . _ ~ is %XX (upper-case hex). */
export function uriEncode(text: string, keepSlash: boolean): string {
  let encoded = "";
  for (const byte of Buffer.from(text, "utf8")) {
    const char = String.fromCharCode(byte);
    if (/[A-Za-z0-9\-._~]/.test(char) || (keepSlash && char === "/")) encoded += char;
    else encoded += `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return encoded;
}

function sha256Hex(text: string): string {
  return createHash("sha256").update(text, "utf8").digest("hex");
}

function hmac(key: Buffer | string, text: string): Buffer {
  return createHmac("sha256", key).update(text, "utf8").digest();
}

const signingKeys = new Map<string, Buffer>();
const signingKeysMax = 16;

function signingKey(secret: string, day: string, region: string, service: string): Buffer {
  const cacheKey = `${secret}\u0000${day}\u0000${region}\u0000${service}`;
  const cached = signingKeys.get(cacheKey);
  if (cached !== undefined) return cached;
  const key = hmac(hmac(hmac(hmac(`AWS4${secret}`, day), region), service), "aws4_request");
  if (signingKeys.size >= signingKeysMax) signingKeys.clear();
  signingKeys.set(cacheKey, key);
  return key;
}

/** The full header set to send (without host, which fetch sets from the URL, and which is signed). */
export function signRequest(input: SignInput): Record<string, string> {
  const service = input.service ?? "s3";
  const now = input.now ?? new Date();
  const amzDate = now
    .toISOString()
    .replace(/[-:]/g, "")
    .replace(/\.\d{3}/, "");
  const day = amzDate.slice(0, 8);
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(input.headers)) headers[name.toLowerCase()] = value.trim();
  headers["x-amz-date"] = amzDate;
  headers["x-amz-content-sha256"] = input.payloadSha256;
  if (input.credentials.sessionToken) headers["x-amz-security-token"] = input.credentials.sessionToken;
  const signed: Record<string, string> = { ...headers, host: input.url.host };
  const names = Object.keys(signed).sort();
  const canonicalHeaders = names.map((name) => `${name}:${signed[name]}\n`).join("");
  const signedHeaders = names.join(";");
  const query = [...input.url.searchParams.entries()]
    .map(([name, value]) => [uriEncode(name, false), uriEncode(value, false)] as const)
    .sort(([a, av], [b, bv]) => (a < b ? -1 : a > b ? 1 : av < bv ? -1 : av > bv ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join("&");
  // The URL's pathname is already percent-encoded by the caller (s3-store encodes each key once).
  const canonicalRequest = [
    input.method,
    input.url.pathname,
    query,
    canonicalHeaders,
    signedHeaders,
    input.payloadSha256,
  ].join("\n");
  const scope = `${day}/${input.region}/${service}/aws4_request`;
  const stringToSign = ["AWS4-HMAC-SHA256", amzDate, scope, sha256Hex(canonicalRequest)].join("\n");
  const signature = createHmac(
    "sha256",
    signingKey(input.credentials.secretAccessKey, day, input.region, service),
  )
    .update(stringToSign, "utf8")
    .digest("hex");
  headers.authorization = `AWS4-HMAC-SHA256 Credential=${input.credentials.accessKeyId}/${scope}, SignedHeaders=${signedHeaders}, Signature=${signature}`;
  return headers;
}
