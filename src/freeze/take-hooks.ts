/**
 * Runs a user's pre-take or post-take hook: `/bin/sh -c COMMAND` with the snapshot id and device names in
 * the environment (BLOCKSNAP_SNAPSHOT_ID, BLOCKSNAP_DEVICES space-separated, BLOCKSNAP_HOOK "pre-take" or
 * "post-take", BLOCKSNAP_TAKE_RESULT "ok"/"failed" for post-take). Bounded: killed after `timeoutMs`
 * (SIGTERM, then SIGKILL), output capped. Never throws: the result says what happened.
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
    const child = spawn("/bin/sh", ["-c", run.command], {
      stdio: ["ignore", "pipe", "pipe"],
      env: {
        ...process.env,
        BLOCKSNAP_SNAPSHOT_ID: run.snapshotId,
        BLOCKSNAP_DEVICES: run.deviceNames.join(" "),
        BLOCKSNAP_HOOK: run.hook,
        ...(run.takeResult ? { BLOCKSNAP_TAKE_RESULT: run.takeResult } : {}),
      },
    });
    const collect = (chunk: Buffer) => {
      if (output.length < hookOutputBytesMax)
        output += chunk.toString("utf8").slice(0, hookOutputBytesMax - output.length);
    };
    child.stdout.on("data", collect);
    child.stderr.on("data", collect);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGTERM");
      setTimeout(() => child.kill("SIGKILL"), killGraceMs).unref();
    }, run.timeoutMs);
    const finish = (exitCode: number | null) => {
      clearTimeout(timer);
      resolve({ command: run.command, exitCode, timedOut, durationMs: performance.now() - startMs, output });
    };
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
