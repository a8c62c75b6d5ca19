/**
 * `blocksnap log-level` against the real daemon: at the default info level no debug line is logged; after
 * `log-level debug` every control request logs one; after `log-level warn` info lines (device added) stop;
 * `status` and `log-level` without an argument show the level in force; a bad level is a usage error.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { LogLevelView, StatusView } from "../../src/daemon/api-types.js";
import { DaemonProcess } from "./cli-harness.js";

const waitMs = 30_000;
let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-log-level-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

/** The daemon's log records so far (JSON lines on stderr: not a terminal). */
function records(): { level: number; msg: string; device?: string; path?: string }[] {
  return daemon.stderr
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as { level: number; msg: string });
}

/** Waits (bounded) until a record matches: pino writes synchronously, but the pipe may lag. */
async function waitForRecord(what: string, match: (record: ReturnType<typeof records>[number]) => boolean) {
  const deadline = Date.now() + waitMs;
  while (!records().some(match)) {
    if (Date.now() > deadline) assert.fail(`no log line: ${what}\n${daemon.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

void test("log-level debug shows debug lines, log-level warn stops info lines", async () => {
  await daemon.cliOk(["device", "add", "d0", "--backend", "memory:", "--size", "1M"]);
  await waitForRecord("device added d0", (record) => record.msg === "device added" && record.device === "d0");
  assert.equal(records().filter((record) => record.level === 20).length, 0, "no debug line at info");
  assert.equal((await daemon.cliJson<StatusView>(["status"])).logLevel, "info");
  assert.match(await daemon.cliOk(["status"]), /^log level:\s+info$/m);

  assert.deepEqual(await daemon.cliJson<LogLevelView>(["log-level", "debug"]), {
    level: "debug",
    previous: "info",
  });
  await daemon.cliOk(["device", "list"]);
  await waitForRecord(
    "a debug line for a control request",
    (record) => record.level === 20 && record.msg === "control request" && record.path === "/v1/devices",
  );
  assert.equal((await daemon.cliOk(["log-level"])).trim(), "debug");

  assert.equal((await daemon.cliOk(["log-level", "warn"])).trim(), "log level debug → warn");
  // The change itself is logged while debug was still in force.
  await waitForRecord("the change to warn", (record) => record.msg === "log level changed");
  const before = records().length;
  await daemon.cliOk(["device", "add", "d1", "--backend", "memory:", "--size", "1M"]);
  await daemon.cliOk(["device", "list"]);
  assert.equal((await daemon.cliJson<StatusView>(["status"])).logLevel, "warn");
  assert.deepEqual(records().slice(before), [], "no info or debug line at warn");

  const bad = await daemon.cli(["log-level", "verbose"]);
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /Allowed choices are fatal, error, warn, info, debug, trace, silent/);
  assert.equal((await daemon.cliOk(["log-level"])).trim(), "warn");
});
