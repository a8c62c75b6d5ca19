/**
 * Where the S3 store finds its credentials, in the order the AWS tools use: the environment
 * (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN), then the shared credentials file
 * (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials) in profile AWS_PROFILE (default `default`). Endpoint
 * and region fall back to AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_REGION / AWS_DEFAULT_REGION.
 *
 * Not done: instance metadata (IMDS), SSO, assume-role and credential_process; the config file
 * (~/.aws/config) is not read.
 */
import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { BlockError } from "../block/errors.js";
import type { S3Credentials } from "./s3-sigv4.js";

export async function loadS3Credentials(env: NodeJS.ProcessEnv = process.env): Promise<S3Credentials> {
  const accessKeyId = env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.AWS_SECRET_ACCESS_KEY;
  if (accessKeyId && secretAccessKey)
    return { accessKeyId, secretAccessKey, sessionToken: env.AWS_SESSION_TOKEN || undefined };
  const path = env.AWS_SHARED_CREDENTIALS_FILE || join(env.HOME || homedir(), ".aws", "credentials");
  const profile = env.AWS_PROFILE || "default";
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT")
      throw new BlockError(
        "EACCES",
        `No S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write ${path}`,
      );
    throw new BlockError("EACCES", `Cannot read S3 credentials file ${path}: ${(error as Error).message}`);
  }
  const section = parseIni(text).get(profile);
  const fileKeyId = section?.get("aws_access_key_id");
  const fileSecret = section?.get("aws_secret_access_key");
  if (!fileKeyId || !fileSecret)
    throw new BlockError(
      "EACCES",
      `No S3 credentials in profile [${profile}] of ${path} (aws_access_key_id and aws_secret_access_key)`,
    );
  return {
    accessKeyId: fileKeyId,
    secretAccessKey: fileSecret,
    sessionToken: section?.get("aws_session_token") || undefined,
  };
}

/** `[section]` and `name = value` lines; `#` and `;` start comments. */
function parseIni(text: string): Map<string, Map<string, string>> {
  const sections = new Map<string, Map<string, string>>();
  let current: Map<string, string> | null = null;
  for (const rawLine of text.split(/\r?\n/)) {
    const line = rawLine.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const header = /^\[\s*([^\]]+?)\s*\]$/.exec(line);
    if (header) {
      const name = (header[1] ?? "").replace(/^profile\s+/, "");
      current = sections.get(name) ?? new Map();
      sections.set(name, current);
      continue;
    }
    const equals = line.indexOf("=");
    if (current !== null && equals > 0)
      current.set(line.slice(0, equals).trim().toLowerCase(), line.slice(equals + 1).trim());
  }
  return sections;
}

export function s3RegionFrom(explicit: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  return explicit || env.AWS_REGION || env.AWS_DEFAULT_REGION || "us-east-1";
}

export function s3EndpointFrom(
  explicit: string | undefined,
  region: string,
  env: NodeJS.ProcessEnv = process.env,
): string {
  const endpoint =
    explicit || env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL || `https://s3.${region}.amazonaws.com`;
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    throw new BlockError("EINVAL", `Invalid S3 endpoint ${JSON.stringify(endpoint)}: give a URL`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:")
    throw new BlockError("EINVAL", `Invalid S3 endpoint ${endpoint}: http:// or https:// only`);
  if (url.search !== "" || url.hash !== "")
    throw new BlockError("EINVAL", `Invalid S3 endpoint ${endpoint}: no query or fragment`);
  return url.toString().replace(/\/+$/, "");
}
