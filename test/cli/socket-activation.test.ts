/**
 * systemd socket activation: `nbdinfo -- [ blocksnap serve … ]` starts the daemon with LISTEN_PID and
 * LISTEN_FDS=1 and the listening socket on fd 3 (as a .socket unit would); the daemon serves NBD there,
 * with the devices of its registry.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { which } from "../helpers/commands.js";
import { cleanEnvironment, cliPath, DaemonProcess, runCli, runCommand } from "./cli-harness.js";

let directory = "";
after(async () => {
  if (directory) await rm(directory, { recursive: true, force: true });
});

void test("the daemon serves NBD on a socket-activation descriptor (nbdinfo -- [ blocksnap serve ])", async (t) => {
  if (!which("nbdinfo")) return t.skip("nbdinfo is not installed (libnbd-bin)");
  directory = await mkdtemp(join(tmpdir(), "blocksnap-activation-"));
  const stateDir = join(directory, "state");
  const daemon = await DaemonProcess.start(stateDir);
  try {
    const added = await runCli(
      ["device", "add", "disk0", "--backend", "memory:", "--size", "8M", "--socket", daemon.controlSocket],
      { env: cleanEnvironment() },
    );
    assert.equal(added.code, 0, added.stderr);
  } finally {
    assert.deepEqual(await daemon.stop("SIGTERM"), { code: 0, signal: null });
  }
  const serve = [process.execPath, cliPath, "serve", "--state-dir", stateDir, "--nbd-listen", "none"];
  const listed = await runCommand(
    "nbdinfo",
    [
      "--json",
      "--list",
      "--",
      "[",
      ...serve,
      "--nbd-socket",
      "none",
      "--fuse-mount",
      "none",
      "--log-level",
      "warn",
      "]",
    ],
    { env: cleanEnvironment() },
  );
  assert.equal(listed.code, 0, listed.stderr);
  const exports = (
    JSON.parse(listed.stdout) as { exports: Array<{ "export-name": string; "export-size": number }> }
  ).exports;
  assert.deepEqual(
    exports.map((entry) => [entry["export-name"], entry["export-size"]]),
    [["disk0", 8 * 1024 * 1024]],
  );
});
