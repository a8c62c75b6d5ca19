/**
 * Where the real `blocksnap serve` logs: `--json` puts JSON lines on stdout (the start-up report first, stderr
 * silent), a start failure under `--json` ends stdout with an `{"error": …}` line; without `--json` the logs
 * are JSON lines on stderr when stderr is not a terminal. The human lines of a terminal are checked by
 * src/cli/log-output.test.ts (a pseudo-terminal test through util-linux `script` hung under load: left out).
 * Every wait is bounded.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { cleanEnvironment, cliPath, runCli } from "./cli-harness.js";

const waitMs = 60_000;
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-serve-logs-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** A child whose stdout and stderr are collected; waitFor() polls them, bounded by waitMs. */
class Collected {
  stdout = "";
  stderr = "";
  readonly exited: Promise<number | null>;
  readonly child: ChildProcess;

  constructor(child: ChildProcess) {
    this.child = child;
    child.stdout?.setEncoding("utf8").on("data", (text: string) => {
      this.stdout += text;
    });
    child.stderr?.setEncoding("utf8").on("data", (text: string) => {
      this.stderr += text;
    });
    const exited = new Promise<number | null>((resolve) => child.once("close", (code) => resolve(code)));
    // Bounded: a daemon that does not stop is killed and the test fails on its exit code.
    this.exited = Promise.race([
      exited,
      new Promise<number | null>((resolve) =>
        setTimeout(() => {
          child.kill("SIGKILL");
          resolve(-1);
        }, waitMs).unref(),
      ),
    ]);
  }

  async waitFor(what: string, done: () => boolean): Promise<void> {
    const deadline = Date.now() + waitMs;
    while (!done()) {
      if (Date.now() > deadline || this.child.exitCode !== null) {
        this.child.kill("SIGKILL");
        assert.fail(`gave up waiting for ${what}; stdout:\n${this.stdout}\nstderr:\n${this.stderr}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

function serve(stateDir: string, extra: readonly string[]): Collected {
  const child = spawn(
    process.execPath,
    [cliPath, "serve", "--state-dir", stateDir, "--nbd-socket", "none", "--fuse-mount", "none", ...extra],
    { env: cleanEnvironment(), stdio: ["ignore", "pipe", "pipe"] },
  );
  return new Collected(child);
}

function jsonLines(text: string): Record<string, unknown>[] {
  return text
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

void test("serve --json: the start-up report and the logs are JSON lines on stdout", async () => {
  const stateDir = join(directory, "json");
  const daemon = serve(stateDir, ["--json"]);
  await daemon.waitFor("the ready line", () => daemon.stdout.includes("blocksnap daemon ready"));
  daemon.child.kill("SIGTERM");
  assert.equal(await daemon.exited, 0, daemon.stderr);
  assert.equal(daemon.stderr, "");
  const lines = jsonLines(daemon.stdout);
  const ready = lines.find((line) => line.msg === "blocksnap daemon ready");
  assert.ok(ready !== undefined);
  assert.equal(ready.level, 30);
  assert.equal(ready.stateDir, stateDir);
  assert.equal(ready.controlSocket, join(stateDir, "blocksnap.sock"));
  assert.ok(Array.isArray(ready.whoCanConnect));
  assert.ok(lines.some((line) => line.msg === "blocksnap daemon stopped"));
});

void test("serve --json: a start failure ends stdout with one error line", async () => {
  const file = join(directory, "not-a-socket");
  await writeFile(file, "keep\n");
  const result = await runCli([
    "serve",
    "--json",
    "--state-dir",
    join(directory, "failing"),
    "--socket",
    file,
    "--nbd-socket",
    "none",
    "--fuse-mount",
    "none",
  ]);
  assert.equal(result.code, 1, result.stderr);
  const lines = jsonLines(result.stdout);
  const last = lines.at(-1) ?? {};
  assert.deepEqual(Object.keys(last), ["error"]);
  assert.equal((last.error as { errno: string }).errno, "EEXIST");
  assert.ok(lines.some((line) => line.msg === "blocksnap daemon failed to start" && line.level === 50));
  assert.match(result.stderr, /^blocksnap: .* \(EEXIST\)$/m);
});

void test("serve without --json: JSON lines on stderr when it is not a terminal", async () => {
  const daemon = serve(join(directory, "plain"), []);
  await daemon.waitFor("the ready line", () => daemon.stderr.includes("blocksnap daemon ready"));
  daemon.child.kill("SIGTERM");
  assert.equal(await daemon.exited, 0, daemon.stderr);
  assert.equal(daemon.stdout, "");
  assert.ok(jsonLines(daemon.stderr).some((line) => line.msg === "blocksnap daemon ready"));
});
