/**
 * What a FUSE session must hand to its successor so that a new server process can serve a connection
 * whose INIT an earlier process answered (the supervised engine, src/supervisor/): the negotiated minor,
 * which node id names which export, and which file handle belongs to which node. The kernel keeps using
 * those numbers across the restart; nothing else in the session outlives a request.
 *
 * Written synchronously, before the reply that makes a new number known to the kernel (a LOOKUP that
 * creates a node, an OPEN, a RELEASE), with write-to-temporary + rename: a process killed at any instant
 * leaves the old or the new file, and every number the kernel holds is in it. No fsync: the file only has
 * to survive the process, not the host (after a host crash there is no mount to resume).
 *
 * Not kept: lookup counts (the successor treats every restored node as looked up until the export
 * vanishes: a few bytes per node may outlive their FORGET) and directory handles (a READDIR on an unknown
 * one starts a fresh listing).
 */
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { BlockError } from "../block/errors.js";

export interface FuseSessionState {
  readonly negotiatedMinor: number;
  readonly maxWriteBytes: number;
  readonly nextNodeId: number;
  readonly nodes: readonly { readonly nodeId: number; readonly name: string }[];
  readonly nextHandle: string;
  readonly handles: readonly { readonly handle: string; readonly nodeId: number }[];
}

const stateFormat = "blocksnap-fuse-session";
const stateVersion = 1;

export function writeFuseSessionState(path: string, state: FuseSessionState): void {
  const temporaryPath = `${path}.${process.pid}.tmp`;
  writeFileSync(temporaryPath, JSON.stringify({ format: stateFormat, version: stateVersion, ...state }), {
    mode: 0o600,
  });
  renameSync(temporaryPath, path);
}

/** The saved state, or an EINVAL BlockError naming what is wrong with the file (ENOENT when absent). */
export function readFuseSessionState(path: string): FuseSessionState {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code === "ENOENT" ? "ENOENT" : "EIO";
    throw new BlockError(code, `FUSE session state ${path}: ${String(error)}`, { cause: error });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new BlockError("EINVAL", `FUSE session state ${path} is not JSON`, { cause: error });
  }
  const record = parsed as Record<string, unknown> | null;
  if (record?.format !== stateFormat || record.version !== stateVersion) {
    throw new BlockError("EINVAL", `FUSE session state ${path} has an unknown format`);
  }
  const isCount = (value: unknown): value is number => Number.isSafeInteger(value) && (value as number) >= 0;
  const nodes = record.nodes;
  const handles = record.handles;
  if (
    !isCount(record.negotiatedMinor) ||
    !isCount(record.maxWriteBytes) ||
    !isCount(record.nextNodeId) ||
    typeof record.nextHandle !== "string" ||
    !Array.isArray(nodes) ||
    !Array.isArray(handles) ||
    !nodes.every((node) => isCount(node?.nodeId) && typeof node?.name === "string") ||
    !handles.every((entry) => typeof entry?.handle === "string" && isCount(entry?.nodeId))
  ) {
    throw new BlockError("EINVAL", `FUSE session state ${path} is damaged`);
  }
  return {
    negotiatedMinor: record.negotiatedMinor,
    maxWriteBytes: record.maxWriteBytes,
    nextNodeId: record.nextNodeId,
    nodes,
    nextHandle: record.nextHandle,
    handles,
  };
}
