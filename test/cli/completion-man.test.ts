/**
 * Shell completion and man pages, both generated from the command tree: bash completes commands, options,
 * option values, file names, and device names and snapshot ids from a running daemon; the zsh script loads
 * under compinit; every man page renders with `man -l` without a warning and names every option of its
 * commands, so `--help` and the man pages cannot drift apart.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { Command } from "commander";
import { buildProgram } from "../../src/cli/program.js";
import { missingTools, run } from "../helpers/commands.js";
import { cliPath, DaemonProcess } from "./cli-harness.js";

let directory = "";
let daemon: DaemonProcess | undefined;
let snapshotId = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-completion-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  for (const name of ["disk0", "data1"]) {
    await daemon.cliOk(["device", "add", name, "--backend", "memory:", "--size", "1M"]);
  }
  snapshotId = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "disk0"])
  ).trim();
});

after(async () => {
  if (daemon) assert.equal((await daemon.stop()).code, 0, daemon.stderr);
  await rm(directory, { recursive: true, force: true });
});

/** COMPREPLY of the bash script for a line whose last word is being completed. */
async function bashComplete(words: readonly string[]): Promise<string[]> {
  const quoted = words.map((word) => `'${word.replace(/'/g, "'\\''")}'`).join(" ");
  const script = `source <("${process.execPath}" "${cliPath}" completion bash)
COMP_WORDS=(${quoted}); COMP_CWORD=${words.length - 1}
_blocksnap
printf '%s\\n' "\${COMPREPLY[@]}"`;
  const result = await run("bash", ["--norc", "-c", script], { timeoutMs: 30_000 });
  assert.equal(result.code, 0, result.stderr);
  return result.stdout.split("\n").filter((line) => line !== "");
}

void test("bash completes commands, subcommands, options and option choices", async () => {
  assert.deepEqual(await bashComplete(["blocksnap", "sn"]), ["snapshot"]);
  assert.deepEqual(await bashComplete(["blocksnap", "snapshot", "t"]), ["take"]);
  assert.deepEqual(await bashComplete(["blocksnap", "device", "add", "x", "--cbt"]), ["--cbt-block-size"]);
  assert.deepEqual(await bashComplete(["blocksnap", "serve", "--log-level", "w"]), ["warn"]);
  assert.deepEqual(await bashComplete(["blocksnap", "device", "add", "x", "--backend", `${directory}/st`]), [
    join(directory, "state"),
  ]);
});

void test("bash completes device names and snapshot ids from the daemon of the line's --state-dir", async () => {
  const stateDir = join(directory, "state");
  assert.deepEqual(await bashComplete(["blocksnap", "device", "remove", "--state-dir", stateDir, "d"]), [
    "disk0",
    "data1",
  ]);
  assert.deepEqual(await bashComplete(["blocksnap", "cbt", "info", "--state-dir", stateDir, "da"]), [
    "data1",
  ]);
  assert.deepEqual(
    await bashComplete(["blocksnap", "snapshot", "create", "--state-dir", stateDir, "--device", "di"]),
    ["disk0"],
  );
  assert.deepEqual(
    await bashComplete(["blocksnap", "snapshot", "take", "--state-dir", stateDir, snapshotId.slice(0, 4)]),
    [snapshotId],
  );
  // No daemon there: nothing, and no hang.
  assert.deepEqual(
    await bashComplete(["blocksnap", "device", "remove", "--state-dir", join(directory, "none"), ""]),
    [],
  );
});

void test("the zsh completion script loads under compinit and registers _blocksnap", async (t) => {
  const missing = missingTools("zsh");
  if (missing) return t.skip(missing);
  const script = `autoload -U compinit; compinit -u -D
source <("${process.execPath}" "${cliPath}" completion zsh)
print -r -- \${+functions[_blocksnap]} \${_comps[blocksnap]}`;
  const result = await run("zsh", ["-f", "-c", script], { timeoutMs: 30_000 });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stderr, "");
  assert.equal(result.stdout.trim(), "1 _blocksnap");
});

function commandsOf(command: Command): Command[] {
  return command.commands.flatMap((child) => [child, ...commandsOf(child)]);
}

void test("every man page renders with man -l without warnings and names every option of its commands", async (t) => {
  const missing = missingTools("man");
  if (missing) return t.skip(missing);
  const manDir = join(directory, "man8");
  const installed = await run(process.execPath, [cliPath, "man", "--install", manDir, "--json"]);
  assert.equal(installed.code, 0, installed.stderr);
  const { written } = JSON.parse(installed.stdout) as { written: string[] };
  const program = buildProgram();
  const groups = program.commands.filter((command) => command.commands.length > 0);
  assert.deepEqual(
    written.map((path) => path.slice(manDir.length + 1)),
    ["blocksnap.8", ...groups.map((group) => `blocksnap-${group.name()}.8`)],
  );
  for (const path of written) {
    const rendered = await run("man", ["--warnings", "-l", path], {
      env: { ...process.env, MANPAGER: "cat", MANWIDTH: "200", MAN_KEEP_FORMATTING: "" },
    });
    assert.equal(rendered.code, 0, rendered.stderr);
    assert.equal(rendered.stderr, "", `${path}: ${rendered.stderr}`);
    const group = groups.find((candidate) => path.endsWith(`blocksnap-${candidate.name()}.8`));
    const commands =
      group === undefined
        ? program.commands.filter((command) => command.commands.length === 0)
        : commandsOf(group);
    const roff = await readFile(path, "utf8");
    for (const command of commands) {
      assert.match(rendered.stdout, new RegExp(`\\b${command.name()}\\b`), `${path} lacks ${command.name()}`);
      for (const option of command.options) {
        assert.ok(
          rendered.stdout.includes(option.flags),
          `${path} lacks ${command.name()} ${option.flags}:\n${roff.slice(0, 400)}`,
        );
      }
    }
    assert.match(rendered.stdout, /\$ blocksnap /, `${path} has an example`);
  }
});
