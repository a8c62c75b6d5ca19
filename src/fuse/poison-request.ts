/**
 * The FUSE request that was in hand when a supervised engine broke an invariant. Such an engine does not
 * answer that request (an EIO would reach the file system on the loop device, which the supervised engine
 * exists to spare it): it records the request here and aborts, and the kernel resends it to the next engine
 * (FUSE_NOTIFY_RESEND). A bug that struck by chance (a race) then passes; a request that breaks an
 * invariant every time would kill every engine, so once it has killed poisonCrashesMax engines the next one
 * answers it EIO without running it, logs why, and serves on.
 *
 * The kernel keeps a request's unique id across the resend, with FUSE_UNIQUE_RESEND (bit 63) set. The file
 * is written with write-to-temporary + rename before the abort; it is removed once the request was
 * answered, and when a fresh connection is mounted (unique ids start again there). Unsupervised engines
 * keep the older rule: answer EIO, then abort (nobody would resend).
 */
import { readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { assert } from "../util/assert.js";

/** Engines a request may kill before it is answered EIO unrun. */
export const poisonCrashesMax = 2;
/** Set by the kernel in the unique id of a request it resends (include/uapi/linux/fuse.h). */
const FUSE_UNIQUE_RESEND = 1n << 63n;

export interface PoisonRecord {
  /** The request's unique id without the resend bit, decimal. */
  readonly unique: string;
  readonly opcode: number;
  readonly crashes: number;
}

/** The unique id a request had when it was first sent. */
export function originalUnique(unique: bigint): bigint {
  return unique & ~FUSE_UNIQUE_RESEND;
}

export function readPoison(path: string): PoisonRecord | null {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return null;
  }
  try {
    const parsed = JSON.parse(text) as Partial<PoisonRecord>;
    if (typeof parsed.unique !== "string" || !/^\d+$/.test(parsed.unique)) return null;
    if (typeof parsed.opcode !== "number" || typeof parsed.crashes !== "number") return null;
    return { unique: parsed.unique, opcode: parsed.opcode, crashes: parsed.crashes };
  } catch {
    return null;
  }
}

export function writePoison(path: string, record: PoisonRecord): void {
  const temporary = `${path}.tmp`;
  writeFileSync(temporary, JSON.stringify(record));
  renameSync(temporary, path);
}

export function clearPoison(path: string): void {
  rmSync(path, { force: true });
}

/**
 * Test hook, off unless BLOCKSNAP_TEST_FUSE_WRITE_ASSERT names a file: while that file exists, a FUSE WRITE
 * breaks an invariant (content `once`: the file is removed first, so only one request fails; otherwise
 * every one). The supervised-engine tests use it to prove the rules above; one environment lookup at load.
 */
const writeAssertHookPath = process.env.BLOCKSNAP_TEST_FUSE_WRITE_ASSERT;

export function writeAssertHook(): void {
  if (writeAssertHookPath === undefined) return;
  let mode: string;
  try {
    mode = readFileSync(writeAssertHookPath, "utf8").trim();
  } catch {
    return;
  }
  if (mode === "once") rmSync(writeAssertHookPath, { force: true });
  assert(false, "test hook: a broken invariant in a FUSE write");
}

/** Where the record lives: beside the session state a successor reads. */
export function poisonPathFor(statePath: string): string {
  return `${statePath}.poison`;
}
