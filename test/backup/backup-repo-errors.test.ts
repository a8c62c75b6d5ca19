/**
 * The repository refusals as a user meets them (issue 13: "clear one-line errors for a wrong key, a missing
 * repo, a foreign or newer repository format"), through the CLI and, for `backup create`, through the
 * daemon: one line on stderr naming the repository, a non-zero exit, and nothing in the directory changed.
 * The wrong key is covered with real data by backup-cli.test.ts; the full disk by the backup job tests.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DaemonProcess, runCli } from "../cli/cli-harness.js";
import { runOk } from "../helpers/commands.js";

let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-repo-errors-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

/** Every file under `root` with its size and modification time: what "nothing changed" compares. */
async function snapshotOf(root: string): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await readdir(root, { recursive: true, withFileTypes: true })) {
    const path = join(entry.parentPath, entry.name);
    const info = await stat(path);
    found.push(`${path} ${info.isDirectory() ? "dir" : `${info.size} ${info.mtimeMs}`}`);
  }
  return found.sort();
}

function assertOneLine(result: { code: number | null; stderr: string }, pattern: RegExp, what: string): void {
  assert.notEqual(result.code, 0, `${what}: must fail`);
  const lines = result.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `${what}: one line, got ${result.stderr}`);
  assert.match(lines[0] ?? "", pattern, what);
}

void test("a missing, foreign or newer repository: one clear line, non-zero exit, nothing changed", async () => {
  daemon = await DaemonProcess.start(join(directory, "state"));
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(4 << 20), backend]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);

  const missing = join(directory, "missing");
  for (const args of [
    ["backup", "list", "--repo", missing],
    ["backup", "verify", "--repo", missing],
    ["backup", "restore", "d0/latest", "--repo", missing, "--to", join(directory, "out.img")],
  ]) {
    assertOneLine(await runCli(args), /missing.*not a blocksnap backup repository/, args.join(" "));
  }
  assertOneLine(
    await daemon.cli(["backup", "create", "--repo", missing, "--device", "d0"]),
    /not a blocksnap backup repository/,
    "backup create into a missing repository",
  );
  await assert.rejects(stat(missing), "nothing was created in its place");
  await assert.rejects(stat(join(directory, "out.img")), "no restored file");

  // Another tool's repository with a file named config (restic's is JSON too).
  const foreign = join(directory, "foreign");
  await mkdir(join(foreign, "data"), { recursive: true });
  await writeFile(
    join(foreign, "config"),
    JSON.stringify({ version: 2, id: "5c7e", chunker_polynomial: "3d" }),
  );
  await writeFile(join(foreign, "data", "blob"), "someone else's data");
  const foreignBefore = await snapshotOf(foreign);
  for (const args of [
    ["backup", "list", "--repo", foreign],
    ["backup", "init", "--repo", foreign],
  ]) {
    assertOneLine(await runCli(args), /foreign|exists|not a blocksnap backup repository/, args.join(" "));
  }
  assertOneLine(
    await daemon.cli(["backup", "create", "--repo", foreign, "--device", "d0"]),
    /foreign|not a blocksnap backup repository/,
    "backup create into a foreign repository",
  );
  assert.deepEqual(await snapshotOf(foreign), foreignBefore, "the foreign repository is untouched");

  // A repository of a newer blocksnap: refused by this one, not "upgraded".
  const newer = join(directory, "newer");
  await runCli(["backup", "init", "--repo", newer]).then((result) =>
    assert.equal(result.code, 0, result.stderr),
  );
  const config = JSON.parse(await readFile(join(newer, "config"), "utf8")) as Record<string, unknown>;
  await writeFile(join(newer, "config"), JSON.stringify({ ...config, version: 99 }));
  const newerBefore = await snapshotOf(newer);
  assertOneLine(
    await runCli(["backup", "list", "--repo", newer]),
    /version 99|newer/,
    "backup list of a newer format",
  );
  assertOneLine(
    await daemon.cli(["backup", "create", "--repo", newer, "--device", "d0"]),
    /version 99|newer/,
    "backup create into a newer format",
  );
  assert.deepEqual(await snapshotOf(newer), newerBefore, "the newer repository is untouched");
});
