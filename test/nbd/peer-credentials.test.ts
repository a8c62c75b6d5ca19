/**
 * PeerUids against real Unix sockets: the resident helper (pidfd_getfd) and the batch helpers give the
 * kernel's SO_PEERCRED uid of the connecting process, for this process's uid and (as root) for a client
 * running as nobody; many sockets at once; a missing helper command gives undefined and a failure message.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { PeerUids } from "../../src/nbd/peer-credentials.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-peer-uids-"));
chmodSync(directory, 0o755);
after(() => rmSync(directory, { recursive: true, force: true }));

/** A listening Unix socket whose accepted sockets are handed to `onSocket`, paused as nbd-server.ts does. */
async function listen(
  name: string,
  onSocket: (socket: net.Socket) => void,
): Promise<{ path: string; server: net.Server }> {
  const path = join(directory, name);
  const server = net.createServer({ pauseOnConnect: true }, onSocket);
  await new Promise<void>((resolve) => server.listen(path, resolve));
  chmodSync(path, 0o777);
  return { path, server };
}

async function uidsOfConnections(peerUids: PeerUids, count: number): Promise<Array<number | undefined>> {
  const answers: Array<Promise<number | undefined>> = [];
  const accepted: net.Socket[] = [];
  const { path, server } = await listen(`many-${peerUids.mode}-${count}.sock`, (socket) => {
    accepted.push(socket);
    answers.push(peerUids.uidOf(socket));
  });
  const clients = Array.from({ length: count }, () => net.connect(path));
  for (let poll = 0; poll < 1000 && answers.length < count; poll += 1)
    await new Promise((r) => setTimeout(r, 5));
  const uids = await Promise.all(answers);
  for (const socket of [...clients, ...accepted]) socket.destroy();
  server.close();
  return uids;
}

test("the resident helper and the batch helpers read the connecting process's uid, many sockets at once", async () => {
  const ownUid = process.getuid?.();
  const resident = new PeerUids();
  try {
    assert.deepEqual(await uidsOfConnections(resident, 1), [ownUid]);
    assert.equal(resident.mode, "resident", "pidfd_getfd works here (kernel ≥ 5.6, no Yama)");
    assert.deepEqual(await uidsOfConnections(resident, 20), Array(20).fill(ownUid));
  } finally {
    resident.close();
  }
  const batch = new PeerUids({ resident: false });
  assert.equal(batch.mode, "batch");
  assert.deepEqual(await uidsOfConnections(batch, 20), Array(20).fill(ownUid));
});

test("a client running as another user is seen as that user (root only)", async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip("needs root to run a client as nobody");
    return;
  }
  for (const peerUids of [new PeerUids(), new PeerUids({ resident: false })]) {
    let answer: Promise<number | undefined> | undefined;
    const { path, server } = await listen(`nobody-${peerUids.mode}.sock`, (socket) => {
      answer = peerUids.uidOf(socket);
    });
    const client = spawn(
      process.execPath,
      [
        "-e",
        `require("node:net").connect(${JSON.stringify(path)}).on("connect", () => setTimeout(() => process.exit(0), 3000))`,
      ],
      { uid: 65534, gid: 65534, stdio: "ignore" },
    );
    for (let poll = 0; poll < 1000 && answer === undefined; poll += 1)
      await new Promise((r) => setTimeout(r, 5));
    assert.ok(answer, "the client connected");
    assert.equal(await answer, 65534, `${peerUids.mode}: the peer's uid`);
    client.kill();
    server.close();
    peerUids.close();
  }
});

test("a socket already closed and a helper command that does not exist give undefined, never a rejection", async () => {
  const failures: string[] = [];
  const missing = new PeerUids({
    command: "/nonexistent/perl",
    onHelperFailure: (message) => failures.push(message),
  });
  assert.deepEqual(await uidsOfConnections(missing, 3), [undefined, undefined, undefined]);
  assert.equal(missing.mode, "batch", "no resident helper: the batch path took over");
  assert.ok(
    failures.some((message) => message.includes("/nonexistent/perl")),
    failures.join("; "),
  );
  const peerUids = new PeerUids();
  const { path, server } = await listen("closed.sock", (socket) => {
    socket.destroy();
    void peerUids.uidOf(socket).then((uid) => closedAnswers.push(uid));
  });
  const closedAnswers: Array<number | undefined> = [];
  const client = net.connect(path);
  for (let poll = 0; poll < 1000 && closedAnswers.length === 0; poll += 1)
    await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(closedAnswers, [undefined]);
  client.destroy();
  server.close();
  peerUids.close();
});
