/**
 * FIFREEZE / FITHAW through util-linux's fsfreeze, run asynchronously: freezing syncs the file system,
 * and its dirty data flows through the loop device into blocksnap's own FUSE file, which this process
 * must keep serving meanwhile.
 *
 * Bounded without killing: the answer comes after `timeoutMs` at the latest, but a process that runs out
 * of time is left to finish. Killing it would not help (it waits inside the kernel, where signals wait
 * too) and would hide the outcome: a FIFREEZE that completes late has frozen the file system although its
 * caller was told it failed. `late` reports that outcome, so the caller can thaw what froze too late.
 * Stderr is capped.
 */
import { spawn } from "node:child_process";

const stderrBytesMax = 4096;

export interface FsfreezeResult {
  readonly ok: boolean;
  readonly message: string;
  /** Only when the call timed out: resolves true if the process later succeeded after all. */
  readonly late?: Promise<boolean>;
}

export function fsfreeze(
  action: "freeze" | "thaw",
  mountPoint: string,
  timeoutMs: number,
): Promise<FsfreezeResult> {
  const flag = action === "freeze" ? "--freeze" : "--unfreeze";
  return new Promise((resolve) => {
    let stderr = "";
    let answered = false;
    let resolveLate: (succeeded: boolean) => void = () => {};
    const child = spawn("fsfreeze", [flag, mountPoint], { stdio: ["ignore", "ignore", "pipe"] });
    child.stderr.setEncoding("utf8").on("data", (text: string) => {
      if (stderr.length < stderrBytesMax) stderr += text.slice(0, stderrBytesMax - stderr.length);
    });
    const timer = setTimeout(() => {
      answered = true;
      const late = new Promise<boolean>((resolveOutcome) => {
        resolveLate = resolveOutcome;
      });
      resolve({
        ok: false,
        message: `fsfreeze ${flag} ${mountPoint}: timed out after ${timeoutMs} ms`,
        late,
      });
    }, timeoutMs);
    child.once("error", (error) => {
      clearTimeout(timer);
      if (answered) return resolveLate(false);
      answered = true;
      resolve({ ok: false, message: `fsfreeze ${flag} ${mountPoint}: ${error.message}` });
    });
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      if (answered) return resolveLate(code === 0);
      answered = true;
      if (code === 0) return resolve({ ok: true, message: "" });
      const reason = stderr.trim() || (signal ? `killed by ${signal}` : `exit code ${code}`);
      resolve({ ok: false, message: `fsfreeze ${flag} ${mountPoint}: ${reason}` });
    });
  });
}
