/**
 * Helpers shared by the backup tests: the chunk files of a directory repository, and the last line of a
 * `--json` output that streams one JSON document per line (progress lines, then the result).
 */
import assert from "node:assert/strict";
import { readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { ControlClient } from "../../src/cli/control-client.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { runOk } from "../helpers/commands.js";

/** Paths of every chunk file of a directory repository (temporary files excluded). */
export async function chunkPaths(repository: string): Promise<string[]> {
  const found: string[] = [];
  for (const prefix of await readdir(join(repository, "chunks"))) {
    for (const name of await readdir(join(repository, "chunks", prefix))) {
      if (!name.startsWith(".")) found.push(join(repository, "chunks", prefix, name));
    }
  }
  return found.sort();
}

/** How many chunk files and how many bytes they hold. */
export async function chunkFilesOf(repository: string): Promise<{ count: number; bytes: number }> {
  const paths = await chunkPaths(repository).catch(() => []);
  let bytes = 0;
  for (const path of paths) bytes += (await stat(path)).size;
  return { count: paths.length, bytes };
}

/** Every line of a JSON-lines output, parsed. */
export function jsonLines(stdout: string): unknown[] {
  return stdout
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => JSON.parse(line) as unknown);
}

/** The last document of a JSON-lines output (a backup's result after its progress lines). */
export function lastJsonLine<T>(stdout: string): T {
  const lines = jsonLines(stdout);
  assert.ok(lines.length > 0, `no JSON output: ${stdout}`);
  return lines[lines.length - 1] as T;
}

/** Runs `backup create`/`run` with --json (exit 0 asserted) and returns the job's result line. */
export async function backupJson<T>(
  host: { cli(args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> },
  args: readonly string[],
): Promise<T> {
  const result = await host.cli([...args, "--json"]);
  assert.equal(result.code, 0, `blocksnap ${args.join(" ")} failed: ${result.stderr}`);
  return lastJsonLine<T>(result.stdout);
}

/**
 * Starts a full backup of `device` and asks for its cancel at once, both straight through the control API:
 * a backup of a test-sized device ends in a fraction of a second, less than a CLI process takes to start,
 * so a `backup create --detach` followed by a `backup cancel` process often found it done. Returns the
 * job's id; the caller waits for the end (e.g. `backup cancel ID`, which answers once the job has ended).
 */
export async function startCancelledBackup(
  controlSocket: string,
  device: string,
  repository: string,
): Promise<string> {
  const client = new ControlClient({ socketPath: controlSocket });
  const job = await client.post<BackupJobView>("/v1/backups", { device, repository, level: "full" });
  await client.post<BackupJobView>(`/v1/backups/jobs/${job.id}/cancel`, {});
  return job.id;
}

/** A file of `sizeMiB` whose first `randomMiB` are random and the rest zero (a hole). */
export async function randomFile(path: string, sizeMiB: number, randomMiB: number): Promise<void> {
  await runOk("truncate", ["-s", String(sizeMiB << 20), path]);
  await runOk("dd", [
    "if=/dev/urandom",
    `of=${path}`,
    "bs=1M",
    `count=${randomMiB}`,
    "conv=notrunc",
    "status=none",
  ]);
}

/** Overwrites a daemon's device with fresh random bytes over NBD (so a backup of it stores new chunks). */
export async function fillDeviceRandom(
  nbdSocket: string,
  device: string,
  sizeMiB: number,
  scratchPath: string,
): Promise<void> {
  await runOk("dd", ["if=/dev/urandom", `of=${scratchPath}`, "bs=1M", `count=${sizeMiB}`, "status=none"]);
  await runOk("nbdcopy", [scratchPath, `nbd+unix:///${device}?socket=${nbdSocket}`]);
  await rm(scratchPath);
}
