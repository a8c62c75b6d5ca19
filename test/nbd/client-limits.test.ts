/**
 * Per-client NBD connection limits through the real daemon and real clients: one local user (nobody) who
 * opens as many connections as it can gets the per-uid share only, and root still connects; on TCP the
 * limit is per source address. Each test holds its connections open in a helper process that waits on
 * its stdin, so nothing depends on timing.
 */
import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, missingTools, run } from "../helpers/commands.js";

const systemPython = "/usr/bin/python3";
const helperTimeoutMs = 120_000;
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-nbd-limits-"));
  // nobody must reach the socket through the group (--socket-group nogroup), so it must traverse this.
  await chmod(directory, 0o755);
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (runs clients as another user)";
  return missingTools("setpriv", "nbdinfo", systemPython) ?? undefined;
}

async function libnbdMissing(): Promise<string | undefined> {
  const probe = await run(systemPython, ["-c", "import nbd"]);
  return probe.code === 0 ? undefined : "python3-libnbd is not installed";
}

/**
 * A process that opens up to `attempts` connections (libnbd for Unix, raw TCP from a source address for
 * TCP), prints how many the server served, and holds them until its stdin closes.
 */
class ConnectionHolder {
  private readonly child: ChildProcessWithoutNullStreams;
  private stdout = "";
  private stderr = "";
  readonly exited: Promise<number | null>;

  constructor(command: string, args: readonly string[]) {
    this.child = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"] });
    this.child.stdout.setEncoding("utf8").on("data", (text: string) => {
      this.stdout += text;
    });
    this.child.stderr.setEncoding("utf8").on("data", (text: string) => {
      this.stderr += text;
    });
    const timer = setTimeout(() => this.child.kill("SIGKILL"), helperTimeoutMs);
    this.exited = new Promise((resolve) =>
      this.child.once("exit", (code) => {
        clearTimeout(timer);
        resolve(code);
      }),
    );
  }

  /** The count printed once every attempt was made. */
  async served(): Promise<number> {
    const line = await new Promise<string>((resolve, reject) => {
      const check = () => {
        const match = /^held (\d+)$/m.exec(this.stdout);
        if (match !== null) resolve(match[1]!);
      };
      this.child.stdout.on("data", check);
      void this.exited.then(() => reject(new Error(`holder exited early: ${this.stdout}${this.stderr}`)));
      check();
    });
    return Number(line);
  }

  async release(): Promise<void> {
    this.child.stdin.end();
    await this.exited;
  }
}

const unixHolderScript = `
import nbd, sys
path, attempts = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(attempts):
    h = nbd.NBD()
    h.set_export_name("disk0")
    try:
        h.connect_unix(path)
        h.pread(512, 0)
        held.append(h)
    except nbd.Error:
        del h
print("held", len(held), flush=True)
sys.stdin.read()
`;

const tcpHolderScript = `
import socket, sys
source, port, attempts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(attempts):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    greeting = b""
    try:
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                break
            greeting += chunk
    except OSError:
        pass
    if greeting[:8] == b"NBDMAGIC":
        held.append(s)
    else:
        s.close()
print("held", len(held), flush=True)
sys.stdin.read()
`;

void test("one uid gets at most its share of the NBD connections; root still connects", async (t) => {
  const reason = skipReason() ?? (await libnbdMissing());
  if (reason !== undefined) {
    t.skip(reason);
    return;
  }
  const stateDir = join(directory, "unix");
  // Defaults: 256 in all, 64 per client. Before per-client limits nobody took all 256 and root was refused.
  const daemon = await DaemonProcess.start(stateDir, {
    args: ["--nbd-listen", "none", "--fuse-mount", "none", "--socket-group", "nogroup"],
  });
  let holder: ConnectionHolder | undefined;
  try {
    // The export exists before the first connection: a connection now costs milliseconds, so all 256
    // would be refused before a `device add` started after them finished.
    await daemon.cliOk(["device", "add", "disk0", "--backend", "memory:", "--size", "1M"]);
    holder = new ConnectionHolder("setpriv", [
      "--reuid=65534",
      "--regid=65534",
      "--clear-groups",
      systemPython,
      "-c",
      unixHolderScript,
      daemon.nbdSocket,
      "256",
    ]);
    const served = await holder.served();
    assert.equal(served, 64, "nobody gets the per-client share (64), not every slot");
    const root = await run("nbdinfo", ["--size", `nbd+unix:///disk0?socket=${daemon.nbdSocket}`], {
      timeoutMs: 60_000,
    });
    assert.equal(root.code, 0, `root must still connect: ${root.stderr}`);
    assert.equal(root.stdout.trim(), String(1024 * 1024));
  } finally {
    await holder?.release();
    await daemon.stop();
  }
});

void test("on TCP the per-client limit counts connections per source address", async (t) => {
  const reason = skipReason();
  if (reason !== undefined) {
    t.skip(reason);
    return;
  }
  const stateDir = join(directory, "tcp");
  const daemon = await DaemonProcess.start(stateDir, {
    args: ["--nbd-listen", "127.0.0.1:0", "--fuse-mount", "none", "--max-connections-per-client", "3"],
  });
  const holders: ConnectionHolder[] = [];
  try {
    const status = await daemon.cliJson<{ nbd: { tcp: unknown } }>(["status"]);
    const port = portOf(status.nbd.tcp);
    const first = new ConnectionHolder(systemPython, ["-c", tcpHolderScript, "127.0.0.2", String(port), "5"]);
    holders.push(first);
    assert.equal(await first.served(), 3, "one address gets --max-connections-per-client connections");
    const other = new ConnectionHolder(systemPython, ["-c", tcpHolderScript, "127.0.0.3", String(port), "1"]);
    holders.push(other);
    assert.equal(await other.served(), 1, "another address still connects");
  } finally {
    for (const holder of holders) await holder.release();
    await daemon.stop();
  }
});

function portOf(nbdTcp: unknown): number {
  if (typeof nbdTcp === "string") return Number(nbdTcp.slice(nbdTcp.lastIndexOf(":") + 1));
  if (nbdTcp !== null && typeof nbdTcp === "object" && "port" in nbdTcp) return Number(nbdTcp.port);
  assert.fail(`status has no NBD TCP address: ${JSON.stringify(nbdTcp)}`);
}
