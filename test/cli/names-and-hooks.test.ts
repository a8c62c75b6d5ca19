/**
 * Smaller hostile inputs through the real daemon and clients: device names that would read as a path, an
 * option or unprintable text are refused by the CLI and the API with one reason; a 4096-byte NBD export
 * name gets an error reply within the spec's 4096-byte string limit (libnbd reports "no export", not
 * "option error string too long"); a pre-take hook that exits 0 but leaves a `setsid` child is reported
 * as exit 0, not as a timeout, and the child is killed.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { SnapshotView, StatusView } from "../../src/daemon/api-types.js";
import { hasLibnbdPython, libnbdPython } from "../nbd/nbd-test-helpers.js";
import { DaemonProcess, runCli, runCommand } from "./cli-harness.js";

let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-names-hooks-"));
  daemon = await DaemonProcess.start(join(directory, "state"), {
    args: ["--nbd-listen", "none", "--fuse-mount", "none"],
  });
  await daemon.cliOk(["device", "add", "nh0", "--backend", "memory:", "--size", "1M"]);
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

async function deviceNames(): Promise<string[]> {
  return (await daemon.cliJson<StatusView>(["status"])).devices.map((device) => device.name);
}

void test("device names with a leading - or ., .., /, NUL or control characters are refused by CLI and API", async () => {
  const before = await deviceNames();
  const cases: [string, RegExp][] = [
    ["-rf", /must not start with -/],
    [".hidden", /must not start with \./],
    ["a..b", /must not contain \.\./],
    ["..", /must not start with \./],
    ["a/b", /no \/, spaces, NUL or control characters/],
    ["x\u0001y", /no \/, spaces, NUL or control characters/],
    ["tab\tname", /no \/, spaces, NUL or control characters/],
  ];
  for (const [name, reason] of cases) {
    const cli = await runCli([
      "device",
      "add",
      "--state-dir",
      daemon.stateDir,
      "--backend",
      "memory:",
      "--size",
      "1M",
      "--",
      name,
    ]);
    assert.equal(cli.code, 1, `${JSON.stringify(name)}: ${cli.stderr}`);
    assert.match(cli.stderr, reason, JSON.stringify(name));
    assert.match(cli.stderr, /\(EINVAL\)$/m);
  }
  // NUL cannot pass through argv: the API gets it from curl.
  for (const name of ["a\u0000b", "-rf", "a/../b"]) {
    const answer = await runCommand("curl", [
      "--silent",
      "--write-out",
      "\n%{http_code}",
      "--unix-socket",
      daemon.controlSocket,
      "-H",
      "content-type: application/json",
      "--data",
      JSON.stringify({ name, backendPath: "memory:", sizeBytes: 1048576 }),
      "http://blocksnap/v1/devices",
    ]);
    assert.match(answer.stdout, /"errno":"EINVAL".*invalid device name/, JSON.stringify(name));
    assert.match(answer.stdout, /\n400$/);
  }
  // A snapshot refers to devices by the same rule.
  const snapshot = await daemon.cli([
    "snapshot",
    "create",
    "--storage",
    "memory:",
    "--limit",
    "1M",
    "--device=-rf",
  ]);
  assert.equal(snapshot.code, 1, snapshot.stderr);
  assert.match(snapshot.stderr, /must not start with -.*\(EINVAL\)$/m);
  assert.deepEqual(await deviceNames(), before);
});

void test("a 4096-byte NBD export name gets a spec-sized error: libnbd says no such export", async (t) => {
  if (!(await hasLibnbdPython())) {
    t.skip(`${libnbdPython} has no libnbd bindings (python3-libnbd)`);
    return;
  }
  const script = [
    "import nbd, sys",
    "h = nbd.NBD()",
    "h.set_export_name('a' * 4096)",
    "try:",
    "    h.connect_unix(sys.argv[1])",
    "    print('connected')",
    "except nbd.Error as error:",
    "    print('error', error.errno, str(error)[-120:])",
  ].join("\n");
  const result = await runCommand(libnbdPython, ["-c", script, daemon.nbdSocket]);
  assert.equal(result.code, 0, result.stderr);
  assert.doesNotMatch(result.stdout, /too long/);
  assert.match(result.stdout, /^error ENOENT /m);
  // The daemon is still serving.
  assert.ok((await deviceNames()).includes("nh0"));
});

/** Running and not a zombie (a reparented child may wait a moment for its reaper). */
function processAlive(pid: number): boolean {
  try {
    const state = /\) (\S) /.exec(readFileSync(`/proc/${pid}/stat`, "utf8"))?.[1];
    return state !== undefined && state !== "Z";
  } catch {
    return false;
  }
}

void test("a hook that exits 0 but leaves a setsid child: exit 0, no timeout, and the child is killed", async () => {
  const pidFile = join(directory, "hook-child.pid");
  const hook = `setsid sh -c 'echo $$ > ${pidFile}; exec sleep 300' & sleep 0.2; exit 0`;
  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      "memory:",
      "--limit",
      "1M",
      "--device",
      "nh0",
      "--pre-take",
      hook,
    ])
  ).trim();
  let childPid: number | null = null;
  try {
    const take = await daemon.cli(["snapshot", "take", id, "--freeze-timeout", "20000"]);
    assert.equal(take.code, 0, take.stderr);
    childPid = Number((await readFile(pidFile, "utf8")).trim());
    assert.ok(Number.isSafeInteger(childPid) && childPid > 1);
    const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
    assert.equal(info.takeReport?.preTake?.exitCode, 0, JSON.stringify(info.takeReport));
    assert.equal(info.takeReport?.preTake?.timedOut, false, JSON.stringify(info.takeReport));
    // The kill is sent when the hook exits; give the kernel a bounded moment to deliver it.
    for (let attempt = 0; attempt < 100 && processAlive(childPid); attempt++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.equal(processAlive(childPid), false, `the hook's setsid child ${childPid} is still running`);
  } finally {
    if (childPid !== null && processAlive(childPid)) process.kill(childPid, "SIGKILL");
    await daemon.cliOk(["snapshot", "destroy", id]);
  }
});
