/**
 * FIFREEZE / FITHAW through util-linux's fsfreeze, run asynchronously: freezing syncs the file system,
 * and its dirty data flows through the loop device into blocksnap's own FUSE file, which this process
 * must keep serving meanwhile. Each call is bounded by a timeout. A freeze that times out is followed by a
 * thaw attempt, because the kernel may still complete it.
 */
import { execFile } from "node:child_process";

export interface FsfreezeResult {
  readonly ok: boolean;
  readonly message: string;
}

export function fsfreeze(
  action: "freeze" | "thaw",
  mountPoint: string,
  timeoutMs: number,
): Promise<FsfreezeResult> {
  return new Promise((resolve) => {
    execFile(
      "fsfreeze",
      [action === "freeze" ? "--freeze" : "--unfreeze", mountPoint],
      { timeout: timeoutMs, killSignal: "SIGKILL", encoding: "utf8" },
      (error, _stdout, stderr) => {
        if (!error) return resolve({ ok: true, message: "" });
        const reason = error.killed ? `timed out after ${timeoutMs} ms` : stderr.trim() || error.message;
        resolve({ ok: false, message: `fsfreeze --${action} ${mountPoint}: ${reason}` });
      },
    );
  });
}
