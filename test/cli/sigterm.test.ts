/**
 * SIGTERM through the real binary: the daemon (configured through BLOCKSNAP_STATE_DIR, the client through
 * BLOCKSNAP_SOCKET) ends an in-flight long poll with ESHUTDOWN, exits 0 and removes its sockets and lock,
 * while the device registry stays. A SIGTERM sent the moment the daemon answers (its start not finished yet,
 * or just finished) stops it too, every time.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BackgroundCli, cleanEnvironment, DaemonProcess, runCli } from "./cli-harness.js";

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-sigterm-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

void test("SIGTERM: in-flight requests end, exit 0, sockets and lock removed, registry kept", async () => {
  const stateDir = join(directory, "state");
  const daemon = await DaemonProcess.start(stateDir, {
    env: cleanEnvironment({ BLOCKSNAP_STATE_DIR: stateDir }),
    passStateDir: false,
    args: ["--nbd-listen", "127.0.0.1:0", "--fuse-mount", "none"],
  });
  try {
    const env = cleanEnvironment({ BLOCKSNAP_SOCKET: daemon.controlSocket });
    const added = await runCli(["device", "add", "d0", "--backend", "memory:", "--size", "1M"], { env });
    assert.equal(added.code, 0, added.stderr);
    const created = await runCli(
      ["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--device", "d0"],
      { env },
    );
    const id = created.stdout.trim();
    const watcher = new BackgroundCli(["snapshot", "watch", id, "--socket", daemon.controlSocket]);
    await watcher.waitForOutput("watching snapshot");
    await stat(daemon.nbdSocket);

    assert.deepEqual(await daemon.stop("SIGTERM"), { code: 0, signal: null });
    const watched = await watcher.closed;
    assert.equal(watched.code, 1);
    // Depending on where the watch was between its 1-second waits: its wait was ended by the shutdown, or its
    // next request found the socket closing or gone.
    assert.match(
      watched.stderr,
      /^blocksnap: .*(shutting down|not running|ECONNRESET|EPIPE|socket hang up)/m,
    );
    for (const name of ["blocksnap.sock", "nbd.sock", "blocksnap.lock"]) {
      await assert.rejects(stat(join(stateDir, name)), { code: "ENOENT" }, name);
    }
    assert.match(await readFile(join(stateDir, "devices.json"), "utf8"), /"d0"/);
    assert.match(daemon.stderr, /blocksnap daemon stopped/);
  } finally {
    await daemon.stop("SIGKILL");
  }
});

void test("SIGTERM the moment the control socket answers: the daemon stops and exits 0, every time", async () => {
  // The start ends after the control socket answers; a SIGTERM caught then by the listener of the start
  // and dispatched after it was swapped for the serving one was lost, and the daemon served on (seen in
  // CI). A round sends its SIGTERM from 0 to 4 ms after the first answer, so rounds fall before, during
  // and after the end of the start; each exit is awaited with a bound, not timed. The window is narrow:
  // against the old code this test did not hit it here, so it guards the behaviour rather than proving
  // the fix.
  const rounds = 12;
  for (let round = 0; round < rounds; round++) {
    const stateDir = join(directory, `race-${round}`);
    const daemon = await DaemonProcess.start(stateDir);
    await new Promise((resolve) => setTimeout(resolve, round % 5));
    let timer: NodeJS.Timeout | undefined;
    const exit = await Promise.race([
      daemon.stop("SIGTERM"),
      new Promise<null>((resolve) => {
        timer = setTimeout(() => resolve(null), 30_000);
      }),
    ]);
    clearTimeout(timer);
    if (exit === null) {
      await daemon.stop("SIGKILL");
      assert.fail(
        `round ${round}: the daemon did not exit within 30 s of SIGTERM; stderr:\n${daemon.stderr}`,
      );
    }
    assert.deepEqual(exit, { code: 0, signal: null }, `round ${round}: ${daemon.stderr}`);
  }
});
