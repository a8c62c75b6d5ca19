/**
 * `serve --config FILE` through the real binary: the file's keys are serve's long options, a flag on the
 * command line wins over the file, and every bad file (unknown key, bad value, bad switch, a line that is
 * no `key = value`, a missing file) is one `FILE:LINE: …` error with exit code 2 and nothing started.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { DaemonProcess, runCli } from "./cli-harness.js";

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-config-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

async function configFile(name: string, lines: readonly string[]): Promise<string> {
  const file = join(directory, name);
  await writeFile(file, `${lines.join("\n")}\n`);
  return file;
}

void test("serve --config: the file's settings apply, and flags win over them", async () => {
  const stateDir = join(directory, "state");
  const socket = join(directory, "control.sock");
  const file = await configFile("good.conf", [
    "# blocksnap serve settings",
    "",
    `socket = ${socket}`,
    "nbd-socket = none",
    "  fuse-mount=none  ",
    "log-level = warn",
    "stop-wait = 5",
    "insecure-no-tls = false",
  ]);
  let daemon = await DaemonProcess.start(stateDir, { args: ["--config", file], controlSocket: socket });
  try {
    const status = JSON.parse((await runCli(["status", "--json", "--socket", socket])).stdout) as StatusView;
    assert.equal(status.logLevel, "warn");
    assert.equal(status.controlSocket, socket);
    assert.equal(status.nbd.socketPath, null);
    assert.equal(status.fuse.mountDir, null);
    assert.equal(status.stateDir, stateDir);
  } finally {
    assert.equal((await daemon.stop()).code, 0, daemon.stderr);
  }

  daemon = await DaemonProcess.start(stateDir, {
    args: ["--config", file, "--log-level", "debug", "--nbd-socket", join(directory, "nbd.sock")],
    controlSocket: socket,
  });
  try {
    const status = JSON.parse((await runCli(["status", "--json", "--socket", socket])).stdout) as StatusView;
    assert.equal(status.logLevel, "debug");
    assert.equal(status.nbd.socketPath, join(directory, "nbd.sock"));
  } finally {
    assert.equal((await daemon.stop()).code, 0, daemon.stderr);
  }
});

void test("a bad configuration file: one FILE:LINE error, exit 2, nothing started", async () => {
  const cases: readonly { lines: readonly string[]; line: number; message: RegExp }[] = [
    { lines: ["# x", "", "nbd-listn = 127.0.0.1:10809"], line: 3, message: /unknown key "nbd-listn"/ },
    { lines: ["nbd-listen = nowhere"], line: 1, message: /nbd-listen: expected HOST:PORT/ },
    {
      lines: ["fuse-mount = none", "tls = maybe"],
      line: 2,
      message: /tls: expected one of off, on, require/,
    },
    { lines: ["supervise = yes"], line: 1, message: /supervise is a switch: expected true or false/ },
    { lines: ["stop-wait = soon"], line: 1, message: /stop-wait: expected a whole number of seconds/ },
    {
      lines: ["log-level = info", "log-level = debug"],
      line: 2,
      message: /log-level is already set at line 1/,
    },
    { lines: ["--nbd-listen 127.0.0.1:1"], line: 1, message: /expected key = value/ },
    { lines: ["config = /etc/other.conf"], line: 1, message: /unknown key "config"/ },
  ];
  for (const [index, { lines, line, message }] of cases.entries()) {
    const file = await configFile(`bad-${index}.conf`, lines);
    const stateDir = join(directory, `bad-state-${index}`);
    const result = await runCli(["serve", "--config", file, "--state-dir", stateDir, "--json"]);
    assert.equal(result.code, 2, `${lines.join(" | ")}: ${result.stderr}`);
    const escaped = file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    assert.match(result.stderr, new RegExp(`^blocksnap: ${escaped}:${line}: .+ \\(EINVAL\\)\\n$`));
    assert.match(result.stderr, message);
    assert.equal((JSON.parse(result.stdout) as { error: { errno: string } }).error.errno, "EINVAL");
    assert.ok(!existsSync(join(stateDir, "blocksnap.sock")), "nothing started");
  }

  const missing = await runCli(["serve", "--config", join(directory, "absent.conf")]);
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(
    missing.stderr,
    /^blocksnap: cannot read the configuration file .*absent\.conf: .* \(ENOENT\)$/m,
  );
});
