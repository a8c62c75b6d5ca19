/**
 * Runs a user's pre-take or post-take hook: `/bin/sh -c COMMAND` with the snapshot id and device names in
 * the environment (BLOCKSNAP_SNAPSHOT_ID, BLOCKSNAP_DEVICES space-separated, BLOCKSNAP_HOOK "pre-take" or
 * "post-take", BLOCKSNAP_TAKE_RESULT "ok"/"failed" for post-take). Bounded: after `timeoutMs` its whole
 * process group gets SIGTERM, then SIGKILL. The hook runs in a group of its own because the shell forks
 * its commands: killing only the shell would leave e.g. `sleep 60` holding the output pipes, and the take
 * would wait for it. If something still holds the pipes after the SIGKILL (a grandchild that left the
 * group), the result is reported anyway. Output capped. Never throws: the result says what happened.
 */
import { spawn } from "node:child_process";
import { performance } from "node:perf_hooks";
import type { HookResult } from "../engine/engine-types.js";

export const hookOutputBytesMax = 8192;
const killGraceMs = 2000;

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
    const child = spawn("/bin/sh", ["-c", run.command], {
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
      env: {
        ...process.env,
        BLOCKSNAP_SNAPSHOT_ID: run.snapshotId,
        BLOCKSNAP_DEVICES: run.deviceNames.join(" "),
        BLOCKSNAP_HOOK: run.hook,
        ...(run.takeResult ? { BLOCKSNAP_TAKE_RESULT: run.takeResult } : {}),
      },
    });
    const killGroup = (signal: NodeJS.Signals): void => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, signal);
      } catch {
        // The group is gone already.
      }
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
    });
    child.on("error", (error) => {
      output += String(error);
      finish(null);
    });
    child.on("close", (code) => finish(code));
  });
}

export function hookSucceeded(result: HookResult | null): boolean {
  return result === null || (result.exitCode === 0 && !result.timedOut);
}
