/**
 * The on-disk form of a CbtMap's state, checked end to end: magic, format version, a JSON header (the
 * numbers and the generation, plus an opaque `backendIdentity` the caller uses to tell whether the backend
 * changed while nobody tracked it), both maps, and a SHA-256 of everything before it. decode() trusts
 * nothing: a short, torn, foreign or altered file is an EINVAL BlockError naming what is wrong, never a
 * partly loaded map.
 */
import { createHash } from "node:crypto";
import { BlockError } from "../block/errors.js";
import type { CbtState } from "./cbt-map.js";

const magic = Buffer.from("BSNAPCBT", "latin1");
const formatVersion = 1;
const digestBytes = 32;
const headerBytesMax = 64 * 1024;
const fixedBytes = magic.length + 4 + 4;

export type BackendIdentity = Readonly<Record<string, string | number>>;

export interface SavedCbtState {
  readonly state: CbtState;
  readonly backendIdentity: BackendIdentity;
}

export function encodeCbtState(saved: SavedCbtState): Buffer {
  const { state } = saved;
  const header = Buffer.from(
    JSON.stringify({
      generationId: state.generationId,
      generationReason: state.generationReason,
      generationStartedAtMs: state.generationStartedAtMs,
      blockSizeBytes: state.blockSizeBytes,
      deviceSizeBytes: state.deviceSizeBytes,
      snapNumberActive: state.snapNumberActive,
      snapNumberPrevious: state.snapNumberPrevious,
      blockCount: state.writeMap.length,
      backendIdentity: saved.backendIdentity,
    }),
    "utf8",
  );
  const prefix = Buffer.alloc(fixedBytes);
  magic.copy(prefix, 0);
  prefix.writeUInt32LE(formatVersion, magic.length);
  prefix.writeUInt32LE(header.length, magic.length + 4);
  const body = Buffer.concat([prefix, header, state.writeMap, state.readMap]);
  return Buffer.concat([body, createHash("sha256").update(body).digest()]);
}

export function decodeCbtState(bytes: Uint8Array): SavedCbtState {
  const data = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (data.length < fixedBytes + digestBytes || !data.subarray(0, magic.length).equals(magic)) {
    throw bad("not a blocksnap CBT state file");
  }
  const body = data.subarray(0, data.length - digestBytes);
  if (
    !createHash("sha256")
      .update(body)
      .digest()
      .equals(data.subarray(data.length - digestBytes))
  ) {
    throw bad("checksum mismatch");
  }
  const version = data.readUInt32LE(magic.length);
  if (version !== formatVersion) throw bad(`format version ${version} is not ${formatVersion}`);
  const headerLength = data.readUInt32LE(magic.length + 4);
  if (headerLength > headerBytesMax || fixedBytes + headerLength > body.length) throw bad("header length");
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(body.subarray(fixedBytes, fixedBytes + headerLength).toString("utf8"));
  } catch {
    throw bad("header is not JSON");
  }
  const blockCount = header.blockCount;
  if (!isCount(blockCount) || body.length !== fixedBytes + headerLength + 2 * blockCount) {
    throw bad("map length");
  }
  const numbers = [
    "generationStartedAtMs",
    "blockSizeBytes",
    "deviceSizeBytes",
    "snapNumberActive",
    "snapNumberPrevious",
  ] as const;
  for (const key of numbers) if (!isCount(header[key])) throw bad(`header field ${key}`);
  if (typeof header.generationId !== "string" || typeof header.generationReason !== "string") {
    throw bad("header generation");
  }
  const identity = header.backendIdentity;
  if (typeof identity !== "object" || identity === null || Array.isArray(identity)) {
    throw bad("header backendIdentity");
  }
  const mapsOffset = fixedBytes + headerLength;
  return {
    state: {
      generationId: header.generationId,
      generationReason: header.generationReason,
      generationStartedAtMs: header.generationStartedAtMs as number,
      blockSizeBytes: header.blockSizeBytes as number,
      deviceSizeBytes: header.deviceSizeBytes as number,
      snapNumberActive: header.snapNumberActive as number,
      snapNumberPrevious: header.snapNumberPrevious as number,
      writeMap: new Uint8Array(body.subarray(mapsOffset, mapsOffset + blockCount)),
      readMap: new Uint8Array(body.subarray(mapsOffset + blockCount, mapsOffset + 2 * blockCount)),
    },
    backendIdentity: identity as BackendIdentity,
  };
}

function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

function bad(what: string): BlockError {
  return new BlockError("EINVAL", `CBT state: ${what}`);
}
