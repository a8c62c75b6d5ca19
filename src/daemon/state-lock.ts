/**
 * One daemon per state directory. The lock is a file holding the owner's pid, created atomically with
 * link(2) from a fully written temporary file, so a reader never sees a half-written pid. A lock whose pid
 * is dead (or a zombie) was left by a killed daemon: it is removed and the acquisition retried, so a
 * SIGKILL never blocks the next start. Not handled: pid reuse (a lock naming a live unrelated process
 * refuses the start and names the pid and the file to remove), and two daemons racing to take over the
 * same stale lock at the same instant.
 */
import { readFileSync } from "node:fs";
import { link, readFile, rm, writeFile } from "node:fs/promises";
import { BlockError } from "../block/errors.js";
import type { Logger } from "../util/logger.js";

const acquireAttemptsMax = 4;

export class StateLock {
  readonly path: string;
  private released = false;

  private constructor(path: string) {
    this.path = path;
  }

  /** Takes the lock or fails with EBUSY naming the live owner. */
  static async acquire(path: string, logger: Logger): Promise<StateLock> {
    const temporaryPath = `${path}.${process.pid}.tmp`;
    await writeFile(temporaryPath, `${process.pid}\n`, { mode: 0o644 });
    try {
      for (let attempt = 0; attempt < acquireAttemptsMax; attempt++) {
        try {
          await link(temporaryPath, path);
          return new StateLock(path);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
        }
        const ownerPid = await readLockPid(path);
        if (ownerPid !== null && ownerPid !== process.pid && isProcessAlive(ownerPid)) {
          throw new BlockError(
            "EBUSY",
            `another blocksnap daemon (pid ${ownerPid}) holds ${path}; stop it first, or use another --state-dir`,
          );
        }
        logger.warn({ lockPath: path, ownerPid }, "removing stale lock file left by a daemon that is gone");
        await rm(path, { force: true });
      }
      throw new BlockError("EBUSY", `could not take the lock ${path}: it keeps being recreated`);
    } finally {
      await rm(temporaryPath, { force: true });
    }
  }

  /** Removes the lock file if it still names this process. Idempotent. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    if ((await readLockPid(this.path)) === process.pid) await rm(this.path, { force: true });
  }
}

async function readLockPid(path: string): Promise<number | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw error;
  }
  const pid = Number.parseInt(text.trim(), 10);
  return Number.isSafeInteger(pid) && pid > 0 ? pid : null;
}

/** kill(pid, 0) succeeds for zombies too; /proc tells a zombie (already dead, not yet reaped) apart. */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return true;
  }
}
