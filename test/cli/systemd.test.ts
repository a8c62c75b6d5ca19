/**
 * systemd integration: `install-units` writes units that `systemd-analyze verify` accepts without a
 * warning, and the daemon speaks sd_notify (READY=1 with its own MAINPID once serving, STOPPING=1 at
 * stop) to a NOTIFY_SOCKET — received here by a real AF_UNIX datagram socket in python3, since Node
 * cannot bind one.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { access, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { missingTools, run } from "../helpers/commands.js";
import { cleanEnvironment, DaemonProcess, runCli } from "./cli-harness.js";

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-systemd-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

void test("install-units writes blocksnap.service and blocksnap.socket that systemd-analyze verify accepts", async (t) => {
  const missing = missingTools("systemd-analyze");
  if (missing) return t.skip(missing);
  const unitDir = join(directory, "units");
  await run("mkdir", ["-p", unitDir]);
  const installed = await runCli(["install-units", "--dir", unitDir, "--stop-wait", "120", "--json"]);
  assert.equal(installed.code, 0, installed.stderr);
  const { written } = JSON.parse(installed.stdout) as { written: string[] };
  assert.deepEqual(written, [join(unitDir, "blocksnap.service"), join(unitDir, "blocksnap.socket")]);
  const service = await readFile(written[0]!, "utf8");
  assert.match(service, /^Type=notify$/m);
  assert.match(service, /^ExecStart=\S+node\S* \S+\/cli\/main\.js serve --supervise --stop-wait 120$/m);
  assert.match(service, /^TimeoutStopSec=180$/m, "systemd's SIGKILL comes after the daemon's own wait");
  const verified = await run("systemd-analyze", ["verify", ...written], { timeoutMs: 60_000 });
  assert.equal(verified.code, 0, verified.stderr);
  assert.equal(verified.stderr.trim(), "", "no warning about any line of the units");
});

void test("install-units into a directory that does not exist: one line, non-zero exit, nothing written", async () => {
  const result = await runCli(["install-units", "--dir", join(directory, "absent", "units")]);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^blocksnap: cannot write units into .*absent\/units: .*\(ENOENT\)\n$/);
});

/** Collects sd_notify datagrams until STOPPING=1 (or 60 s); one message per output line, fields joined by ";". */
const receiverScript = `
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(60)
print("bound", flush=True)
while True:
    message = s.recv(4096).decode()
    print(";".join(message.split("\\n")), flush=True)
    if "STOPPING=1" in message.split("\\n"):
        break
`;

void test("serve sends READY=1 with its pid once serving and STOPPING=1 at SIGTERM (sd_notify)", async (t) => {
  const missing = missingTools("python3", "systemd-notify");
  if (missing) return t.skip(missing);
  const notifySocket = join(directory, "notify.sock");
  const receiver = spawn("python3", ["-c", receiverScript, notifySocket], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let received = "";
  receiver.stdout.setEncoding("utf8").on("data", (text: string) => {
    received += text;
  });
  const receiverDone = new Promise<number | null>((resolve) => receiver.once("close", resolve));
  try {
    for (let attempt = 0; attempt < 250 && !received.includes("bound"); attempt++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await access(notifySocket);
    const daemon = await DaemonProcess.start(join(directory, "state-notify"), {
      env: cleanEnvironment({ NOTIFY_SOCKET: notifySocket }),
    });
    let stopped: { code: number | null } = { code: null };
    try {
      for (let attempt = 0; attempt < 500 && !received.includes("READY=1"); attempt++) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const ready = received.split("\n").find((line) => line.split(";").includes("READY=1"));
      assert.ok(ready, `no READY=1 received: ${received}`);
      assert.ok(ready.split(";").includes(`MAINPID=${daemon.pid}`), ready);
    } finally {
      stopped = await daemon.stop("SIGTERM");
    }
    assert.equal(stopped.code, 0, daemon.stderr);
    assert.equal(await receiverDone, 0, `receiver: ${received}`);
    const stopping = received.split("\n").find((line) => line.split(";").includes("STOPPING=1"));
    assert.ok(stopping?.split(";").includes(`MAINPID=${daemon.pid}`), received);
  } finally {
    receiver.kill("SIGKILL");
  }
});
