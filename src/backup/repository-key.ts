/**
 * Repository keys: `blocksnap backup key create FILE` writes 32 random bytes (base64, in a small JSON file,
 * mode 0600, never overwriting). From the master key two keys are derived with HMAC-SHA-256 — one names
 * chunks, one encrypts them — and a key check value that the repository config records, so a wrong key is
 * told apart from corruption before any chunk is read.
 */
import { createHmac, randomBytes } from "node:crypto";
import { open, readFile } from "node:fs/promises";
import { BlockError } from "../block/errors.js";
import type { CodecKeys } from "./chunk-codec.js";

const keyFileKind = "blocksnap-backup-key";
const masterKeyBytes = 32;

export interface RepositoryKey extends CodecKeys {
  /** Hex string recorded in the repository config; equal for the same master key. */
  readonly check: string;
}

export function deriveKey(master: Uint8Array): RepositoryKey {
  const derive = (label: string) => createHmac("sha256", master).update(label).digest();
  return {
    idKey: derive("blocksnap chunk id"),
    encryptionKey: derive("blocksnap chunk encryption"),
    check: derive("blocksnap key check").subarray(0, 16).toString("hex"),
  };
}

export async function createKeyFile(path: string): Promise<void> {
  const body = `${JSON.stringify({ kind: keyFileKind, version: 1, key: randomBytes(masterKeyBytes).toString("base64") })}\n`;
  let file: import("node:fs/promises").FileHandle;
  try {
    file = await open(path, "wx", 0o600);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "EEXIST") throw new BlockError("EEXIST", `Key file ${path} already exists; not overwritten`);
    throw new BlockError("EIO", `Cannot create key file ${path}: ${(error as Error).message}`);
  }
  try {
    await file.writeFile(body);
    await file.sync();
  } finally {
    await file.close();
  }
}

export async function readKeyFile(path: string): Promise<RepositoryKey> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    throw new BlockError(
      "ENOENT",
      `Cannot read key file ${path}: ${(error as NodeJS.ErrnoException).code ?? error}`,
    );
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new BlockError("EINVAL", `${path} is not a blocksnap key file`);
  }
  const record = parsed as { kind?: unknown; version?: unknown; key?: unknown };
  if (record.kind !== keyFileKind || record.version !== 1 || typeof record.key !== "string")
    throw new BlockError("EINVAL", `${path} is not a blocksnap key file`);
  const master = Buffer.from(record.key, "base64");
  if (master.length !== masterKeyBytes)
    throw new BlockError("EINVAL", `${path} holds a key of the wrong length`);
  return deriveKey(master);
}
