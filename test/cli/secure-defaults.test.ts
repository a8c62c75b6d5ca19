/**
 * Secure defaults through the real daemon and real clients: with `blocksnap serve`'s defaults another
 * local user (nobody) reaches nothing — no TCP listener, both sockets 0600 even inside a world-readable
 * state directory; `--socket-group` opens both sockets to its members only; a plaintext TCP listener off
 * loopback is refused without `--insecure-no-tls`, and one on loopback is warned about.
 */
import assert from "node:assert/strict";
import { chmod, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { DaemonProcess, runCli } from "./cli-harness.js";

const systemPython = "/usr/bin/python3";
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-secure-"));
  // World-traversable on purpose: the sockets' own modes must be what keeps other users out.
  await chmod(directory, 0o755);
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (runs clients as another user)";
  return missingTools("setpriv", "nbdinfo", "nbdcopy", "getent") ?? undefined;
}

async function gidOf(group: string): Promise<number> {
  const line = (await runOk("getent", ["group", group])).trim();
  return Number(line.split(":")[2]);
}

/** Runs a command as uid nobody with exactly the given group (no supplementary groups). */
function asNobody(gid: number, command: string, args: readonly string[]) {
  return run("setpriv", ["--reuid=65534", `--regid=${gid}`, "--clear-groups", command, ...args], {
    timeoutMs: 30_000,
  });
}

/** `printf hello | nbdcopy - URI` as nobody: the write the issue reproduced. */
function writeHelloAsNobody(gid: number, uri: string) {
  return asNobody(gid, "sh", ["-c", 'printf hello | nbdcopy - "$0"', uri]);
}

/** Connects to a Unix socket as nobody: exit 0 when the connect succeeds. */
function connectAsNobody(gid: number, socketPath: string) {
  const script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n";
  return asNobody(gid, systemPython, ["-c", script, socketPath]);
}

/** The TCP ports a process listens on, from its socket descriptors and /proc/net/tcp{,6}. */
async function listeningTcpPorts(pid: number): Promise<number[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => "");
    const match = /^socket:\[(\d+)\]$/.exec(target);
    if (match?.[1] !== undefined) inodes.add(match[1]);
  }
  const ports: number[] = [];
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    const text = await readFile(table, "utf8").catch(() => "");
    for (const line of text.split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      // local_address is field 1 (HEX_IP:HEX_PORT), st is field 3 (0A = LISTEN), inode is field 9.
      if (fields[3] === "0A" && fields[9] !== undefined && inodes.has(fields[9])) {
        ports.push(Number.parseInt(fields[1]?.split(":")[1] ?? "", 16));
      }
    }
  }
  return ports;
}

async function addDevice(daemon: DaemonProcess, name: string): Promise<string> {
  const backend = join(directory, `${name}.img`);
  await daemon.cliOk(["device", "add", name, "--backend", backend, "--size", "1M"]);
  return backend;
}

void test("defaults: no TCP listener, sockets 0600, another local user reaches neither socket", async (t) => {
  const reason = skipReason();
  if (reason !== undefined) return t.skip(reason);
  const stateDir = join(directory, "default-state");
  await mkdir(stateDir, { mode: 0o755 });
  await chmod(stateDir, 0o755);
  const daemon = await DaemonProcess.start(stateDir, { args: ["--fuse-mount", "none"] });
  try {
    const backend = await addDevice(daemon, "disk0");
    const status = await daemon.cliJson<StatusView>(["status"]);
    assert.equal(status.nbd.tcp, null);
    assert.equal(status.access.socketMode, "0600");
    assert.equal(status.access.socketGroup, null);
    assert.deepEqual(await listeningTcpPorts(daemon.pid), []);
    assert.equal((await stat(daemon.controlSocket)).mode & 0o777, 0o600);
    assert.equal((await stat(daemon.nbdSocket)).mode & 0o777, 0o600);
    const human = await daemon.cliOk(["status"]);
    assert.match(human, /who can connect:\n {2}control socket: user \S+ only \(mode 0600\)/);

    const nogroup = await gidOf("nogroup");
    const write = await writeHelloAsNobody(nogroup, `nbd+unix:///disk0?socket=${daemon.nbdSocket}`);
    assert.notEqual(write.code, 0, "nobody must not write through the NBD socket");
    const info = await asNobody(nogroup, "nbdinfo", [`nbd+unix:///disk0?socket=${daemon.nbdSocket}`]);
    assert.notEqual(info.code, 0, "nobody must not reach the NBD socket");
    assert.match(info.stderr, /Permission denied/);
    const control = await connectAsNobody(nogroup, daemon.controlSocket);
    assert.notEqual(control.code, 0, "nobody must not reach the control socket");
    assert.match(control.stderr, /Permission denied/);
    const head = (await readFile(backend)).subarray(0, 5);
    assert.deepEqual([...head], [0, 0, 0, 0, 0]);
  } finally {
    await daemon.stop();
  }
});

void test("a state directory the daemon creates is 0700", async (t) => {
  if (!isRoot) return t.skip("needs root (checks what other users may traverse)");
  const stateDir = join(directory, "created-state");
  const daemon = await DaemonProcess.start(stateDir);
  try {
    assert.equal((await stat(stateDir)).mode & 0o777, 0o700);
  } finally {
    await daemon.stop();
  }
});

void test("--socket-group opens both sockets to its members, and only to them", async (t) => {
  const reason = skipReason();
  if (reason !== undefined) return t.skip(reason);
  const stateDir = join(directory, "group-state");
  const member = await gidOf("nogroup");
  const outsider = await gidOf("daemon");
  const daemon = await DaemonProcess.start(stateDir, {
    args: ["--fuse-mount", "none", "--socket-group", "nogroup"],
  });
  try {
    const backend = await addDevice(daemon, "disk0");
    const status = await daemon.cliJson<StatusView>(["status"]);
    assert.equal(status.access.socketMode, "0660");
    assert.equal(status.access.socketGroup, "nogroup");
    for (const path of [daemon.controlSocket, daemon.nbdSocket]) {
      const info = await stat(path);
      assert.equal(info.mode & 0o777, 0o660, path);
      assert.equal(info.gid, member, path);
    }
    const stateInfo = await stat(stateDir);
    assert.equal(stateInfo.mode & 0o777, 0o710);
    assert.equal(stateInfo.gid, member);

    const uri = `nbd+unix:///disk0?socket=${daemon.nbdSocket}`;
    const write = await writeHelloAsNobody(member, uri);
    assert.equal(write.code, 0, `a member writes: ${write.stderr}`);
    assert.equal((await readFile(backend)).subarray(0, 5).toString(), "hello");
    const info = await asNobody(member, "nbdinfo", ["--size", uri]);
    assert.equal(info.code, 0, info.stderr);
    assert.equal(info.stdout.trim(), String(1024 * 1024));
    assert.equal((await connectAsNobody(member, daemon.controlSocket)).code, 0);

    const refused = await asNobody(outsider, "nbdinfo", [uri]);
    assert.notEqual(refused.code, 0, "a non-member must not reach the NBD socket");
    assert.notEqual((await connectAsNobody(outsider, daemon.controlSocket)).code, 0);
  } finally {
    await daemon.stop();
  }
});

void test("plaintext TCP: refused off loopback without --insecure-no-tls, warned about on loopback", async () => {
  const refusedState = join(directory, "refused-state");
  const refused = await runCli([
    "serve",
    "--state-dir",
    refusedState,
    "--fuse-mount",
    "none",
    "--nbd-listen",
    "0.0.0.0:0",
  ]);
  assert.equal(refused.code, 1);
  assert.match(
    refused.stderr,
    /^blocksnap: refusing to serve NBD on 0\.0\.0\.0:0 without TLS.*--insecure-no-tls/m,
  );
  assert.deepEqual(
    (await readdir(refusedState).catch(() => [])).filter((name) => name.endsWith(".sock")),
    [],
  );

  const loopback = await DaemonProcess.start(join(directory, "loopback-state"), {
    args: ["--fuse-mount", "none", "--nbd-listen", "127.0.0.1:0"],
  });
  try {
    const status = await loopback.cliJson<StatusView>(["status"]);
    assert.ok(status.nbd.tcp !== null && status.nbd.tcp.port > 0);
    assert.deepEqual(await listeningTcpPorts(loopback.pid), [status.nbd.tcp.port]);
    assert.ok(status.access.whoCanConnect.includes("nbd tcp: every local user, no TLS"));
  } finally {
    await loopback.stop();
  }
  assert.match(loopback.stderr, /without TLS: every local user can read and write every export/);

  const insecure = await DaemonProcess.start(join(directory, "insecure-state"), {
    args: ["--fuse-mount", "none", "--nbd-listen", "0.0.0.0:0", "--insecure-no-tls"],
  });
  await insecure.stop();
  assert.match(insecure.stderr, /--insecure-no-tls.*every host that can reach it/);
});
