/**
 * Runs a user's pre-take or post-take hook: `/bin/sh -c COMMAND` with the snapshot id and device names in
 * the environment (BLOCKSNAP_SNAPSHOT_ID, BLOCKSNAP_DEVICES space-separated, BLOCKSNAP_HOOK "pre-take" or
 * "post-take", BLOCKSNAP_TAKE_RESULT "ok"/"failed" for post-take). Bounded: after `timeoutMs` its whole
 * process group gets SIGTERM, then SIGKILL. The hook runs in a group of its own because the shell forks
 * its commands: killing only the shell would leave e.g. `sleep 60` holding the output pipes, and the take
 * would wait for it. A hook's processes may also leave the group (`setsid cmd &`, a daemonizing tool):
 * each run marks its environment with a random BLOCKSNAP_HOOK_RUN token, which every descendant inherits,
 * and whatever still carries the token is killed as well. When the shell exits, the hook is over: what it
 * left running (its group and every marked process) is killed, and the result is the shell's exit code,
 * not a timeout, even when a leftover held the output pipes. If something still holds the pipes after the
 * SIGKILL (a process that cleared its environment), the result is reported anyway after a grace period.
 * Output capped. Never throws: the result says what happened.
 */
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { performance } from "node:perf_hooks";
import type { HookResult } from "../engine/engine-types.js";

export const hookOutputBytesMax = 8192;
const killGraceMs = 2000;
const runTokenVariable = "BLOCKSNAP_HOOK_RUN";

export interface HookRun {
  readonly command: string;
  readonly hook: "pre-take" | "post-take";
  readonly snapshotId: string;
  readonly deviceNames: readonly string[];
  readonly timeoutMs: number;
  readonly takeResult?: "ok" | "failed";
}

export function runTakeHook(run: HookRun): Promise<HookResult> {
  const startMs = performance.now();
  return new Promise((resolve) => {
    let output = "";
    let timedOut = false;
    let exitCode: number | null = null;
    let graceTimer: NodeJS.Timeout | undefined;
    const runToken = randomUUID();
    const child = spawn("/bin/sh", ["-c", run.command], {
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
      env: {
        ...process.env,
        BLOCKSNAP_SNAPSHOT_ID: run.snapshotId,
        BLOCKSNAP_DEVICES: run.deviceNames.join(" "),
        BLOCKSNAP_HOOK: run.hook,
        ...(run.takeResult ? { BLOCKSNAP_TAKE_RESULT: run.takeResult } : {}),
        [runTokenVariable]: runToken,
      },
    });
    const killGroup = (signal: NodeJS.Signals): void => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, signal);
      } catch {
        // The group is gone already.
      }
      void killMarkedProcesses(runToken, signal);
    };
    const collect = (chunk: Buffer) => {
      if (output.length < hookOutputBytesMax)
        output += chunk.toString("utf8").slice(0, hookOutputBytesMax - output.length);
    };
    child.stdout.on("data", collect);
    child.stderr.on("data", collect);
    let finished = false;
    const finish = (code: number | null) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      clearTimeout(graceTimer);
      child.stdout.destroy();
      child.stderr.destroy();
      resolve({
        command: run.command,
        exitCode: code,
        timedOut,
        durationMs: performance.now() - startMs,
        output,
      });
    };
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup("SIGTERM");
      graceTimer = setTimeout(() => {
        killGroup("SIGKILL");
        finish(exitCode);
      }, killGraceMs);
    }, run.timeoutMs);
    child.on("exit", (code) => {
      exitCode = code;
      if (timedOut) return;
      // The hook is over: end what it left behind, then wait (bounded) for the pipes to drain and close.
      clearTimeout(timer);
      killGroup("SIGKILL");
      graceTimer = setTimeout(() => finish(exitCode), killGraceMs);
    });
    child.on("error", (error) => {
      output += String(error);
      finish(null);
    });
    child.on("close", (code) => finish(code));
  });
}

/**
 * Sends `signal` to every process whose environment carries this run's token (they are the hook's, even
 * after setsid). /proc entries that vanish or cannot be read are skipped; never throws.
 */
async function killMarkedProcesses(runToken: string, signal: NodeJS.Signals): Promise<void> {
  const marker = `${runTokenVariable}=${runToken}\0`;
  let entries: string[];
  try {
    entries = await readdir("/proc");
  } catch {
    return;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const environment = await readFile(`/proc/${entry}/environ`, "latin1");
      if (environment.includes(marker)) process.kill(Number(entry), signal);
    } catch {
      // Gone, or not ours to read: not the hook's.
    }
  }
}
