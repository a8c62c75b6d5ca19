/**
 * NBD access rules (serve --access, issue 9 item 3) through the real daemon and real clients: two PSK
 * identities from psktool, one granted read-write and one read-only; libnbd's nbdinfo/nbdcopy/nbdsh and
 * qemu-img as clients. An `ro` identity reads, its WRITE/TRIM/WRITE_ZEROES get EPERM and the backend file
 * stays byte for byte; an export it may not use is absent from LIST and fails exactly like an export that
 * does not exist; plain-text clients follow the `-` rules. A bad access file stops serve with one line.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { DaemonProcess, runCli } from "../cli/cli-harness.js";
import { type CommandResult, run, runOk, which } from "../helpers/commands.js";

const MiB = 1024 * 1024;

let directory = "";
const daemons: DaemonProcess[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-access-"));
});
after(async () => {
  for (const daemon of daemons) await daemon.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

function missing(): string | undefined {
  for (const tool of ["psktool", "nbdinfo", "nbdcopy", "nbdsh"]) if (!which(tool)) return `needs ${tool}`;
  return undefined;
}

/** nbdsh runs `python3` from PATH: the system one has libnbd's module, a pyenv one may not. */
const nbdshEnvironment = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}` };

/** Runs Python in nbdsh (h is its handle, not yet connected); `URI` is defined for the script. */
function nbdsh(uri: string, script: string): Promise<CommandResult> {
  return run("nbdsh", ["-c", `URI = ${JSON.stringify(uri)}\n${script}`], { env: nbdshEnvironment });
}

/**
 * Connects, then tries a write, a trim and a zero with libnbd's own read-only checks off (strict mode 0),
 * so the requests reach the server; prints the server's answer for each.
 */
const tryModifications = `
h.set_strict_mode(0)
h.set_uri_allow_local_file(True)
h.connect_uri(URI)
print("read_only", h.is_read_only())
for name, call in [("write", lambda: h.pwrite(b"X" * 4096, 0)), ("trim", lambda: h.trim(4096, 0)),
                   ("zero", lambda: h.zero(4096, 0))]:
    try:
        call()
        print(name, "ok")
    except nbd.Error as error:
        print(name, error.errno or "failed")
`;

/**
 * One libnbd connection held open in nbdsh and driven line by line (`read`, `write`): each command prints
 * `<command> ok` or `<command> <errno>`, so a test can act on the server between two requests.
 */
class NbdshSession {
  private readonly child: ChildProcess;
  private output = "";
  private readonly waiters = new Set<() => void>();

  private constructor(uri: string) {
    const script = `URI = ${JSON.stringify(uri)}
import sys
h.set_strict_mode(0)
h.set_uri_allow_local_file(True)
h.connect_uri(URI)
print("ready", "ro" if h.is_read_only() else "rw", flush=True)
for line in sys.stdin:
    command = line.strip()
    try:
        if command == "read":
            h.pread(4096, 0)
        elif command == "write":
            h.pwrite(b"Y" * 4096, 0)
        print(command, "ok", flush=True)
    except nbd.Error as error:
        print(command, error.errno or "failed", flush=True)
`;
    this.child = spawn("nbdsh", ["-c", script], { env: nbdshEnvironment, stdio: ["pipe", "pipe", "pipe"] });
    const collect = (text: string): void => {
      this.output += text;
      for (const waiter of this.waiters) waiter();
    };
    this.child.stdout?.setEncoding("utf8").on("data", collect);
    this.child.stderr?.setEncoding("utf8").on("data", collect);
    this.child.once("exit", () => collect(""));
  }

  static async open(uri: string): Promise<{ session: NbdshSession; mode: string }> {
    const session = new NbdshSession(uri);
    const line = await session.nextLine();
    const mode = /^ready (ro|rw)$/.exec(line)?.[1];
    assert.ok(mode !== undefined, `nbdsh did not connect: ${line}${session.output}`);
    return { session, mode };
  }

  /** Sends a command and returns the answer (`ok` or an errno name). */
  async command(command: "read" | "write"): Promise<string> {
    this.child.stdin?.write(`${command}\n`);
    const line = await this.nextLine();
    const match = new RegExp(`^${command} (\\S+)$`).exec(line);
    assert.ok(match !== null, `unexpected nbdsh output: ${line}`);
    return match[1]!;
  }

  close(): void {
    this.child.stdin?.end();
    this.child.kill("SIGKILL");
  }

  private consumed = 0;

  /** The next complete output line; fails after a bounded wait or when nbdsh exits first. */
  private nextLine(): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => finish(new Error(`nbdsh answered nothing: ${this.output}`)), 60_000);
      const finish = (error: Error | null, line?: string): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (error) reject(error);
        else resolve(line!);
      };
      const check = (): void => {
        const end = this.output.indexOf("\n", this.consumed);
        if (end >= 0) {
          const line = this.output.slice(this.consumed, end);
          this.consumed = end + 1;
          finish(null, line);
        } else if (this.child.exitCode !== null || this.child.signalCode !== null) {
          finish(new Error(`nbdsh exited: ${this.output}`));
        }
      };
      this.waiters.add(check);
      check();
    });
  }
}

async function pskKeys(identities: readonly string[]): Promise<string> {
  const path = join(directory, "keys.psk");
  for (const identity of identities) await runOk("psktool", ["-u", identity, "-p", path]);
  return path;
}

async function start(name: string, args: readonly string[]): Promise<DaemonProcess> {
  const daemon = await DaemonProcess.start(join(directory, name), {
    args: ["--fuse-mount", "none", ...args],
  });
  daemons.push(daemon);
  return daemon;
}

function exportNames(listing: string): string[] {
  return [...listing.matchAll(/^export="([^"]*)":/gm)].map((match) => match[1]!).sort();
}

void test("access rules with two PSK identities: rw writes, ro reads and gets EPERM, hidden exports look absent", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const keys = await pskKeys(["alice", "backup"]);
  const rules = join(directory, "access.conf");
  await writeFile(
    rules,
    [
      "# alice owns the devices, backup may read m0 only, plain-text clients may read m1",
      "alice   m*   rw",
      "backup  m0   ro",
      "-       m1   ro",
    ].join("\n"),
  );
  const daemon = await start("two", ["--tls", "on", "--tls-psk", keys, "--access", rules]);
  const backend = join(directory, "m0.img");
  await runOk("dd", ["if=/dev/urandom", `of=${backend}`, "bs=1M", "count=4", "status=none"]);
  await daemon.cliOk(["device", "add", "m0", "--backend", backend]);
  for (const name of ["m1", "m2"]) {
    await daemon.cliOk(["device", "add", name, "--backend", "memory:", "--size", String(4 * MiB)]);
  }
  const socket = daemon.nbdSocket;
  const uri = (identity: string, exportName: string) =>
    `nbds+unix://${identity}@/${exportName}?socket=${socket}&tls-psk-file=${keys}`;
  const plainUri = (exportName: string) => `nbd+unix:///${exportName}?socket=${socket}`;

  // LIST shows each client what it may use, nothing more.
  assert.deepEqual(exportNames(await runOk("nbdinfo", ["--list", uri("alice", "")])), ["m0", "m1", "m2"]);
  assert.deepEqual(exportNames(await runOk("nbdinfo", ["--list", uri("backup", "")])), ["m0"]);
  assert.deepEqual(exportNames(await runOk("nbdinfo", ["--list", plainUri("")])), ["m1"]);

  // The ro identity: the export is read-only, reads match the backend, modifications get EPERM.
  const before = await readFile(backend);
  assert.match(await runOk("nbdinfo", [uri("backup", "m0")]), /is_read_only: true/);
  const copy = join(directory, "copy.bin");
  await runOk("nbdcopy", [uri("backup", "m0"), copy]);
  assert.ok((await readFile(copy)).equals(before), "the ro identity reads the device");
  const refused = await nbdsh(uri("backup", "m0"), tryModifications);
  assert.equal(refused.code, 0, refused.stderr);
  assert.match(refused.stdout, /read_only True/);
  assert.match(refused.stdout, /^write EPERM$/m);
  assert.match(refused.stdout, /^trim EPERM$/m);
  assert.match(refused.stdout, /^zero EPERM$/m);
  assert.ok((await readFile(backend)).equals(before), "the backend is unchanged after the refused writes");

  // The rw identity writes through the same export.
  assert.match(await runOk("nbdinfo", [uri("alice", "m0")]), /is_read_only: false/);
  const written = await nbdsh(uri("alice", "m0"), tryModifications);
  assert.match(written.stdout, /^write ok$/m, written.stderr);
  const afterWrite = await readFile(backend);
  assert.ok(afterWrite.subarray(0, 4096).equals(Buffer.alloc(4096)), "alice's write, trim and zero landed");
  assert.ok(afterWrite.subarray(4096).equals(before.subarray(4096)));

  // Not granted vs absent: the same exit code and the same message, name for name.
  const hidden = await run("nbdinfo", [uri("backup", "m1")]);
  const absent = await run("nbdinfo", [uri("backup", "nosuch")]);
  assert.notEqual(hidden.code, 0);
  assert.equal(hidden.code, absent.code);
  assert.equal(hidden.stderr.replaceAll("m1", "NAME"), absent.stderr.replaceAll("nosuch", "NAME"));
  assert.doesNotMatch(hidden.stdout, /m1/);
  const plainHidden = await run("nbdinfo", [plainUri("m2")]);
  const plainAbsent = await run("nbdinfo", [plainUri("nosuch")]);
  assert.notEqual(plainHidden.code, 0);
  assert.equal(plainHidden.stderr.replaceAll("m2", "NAME"), plainAbsent.stderr.replaceAll("nosuch", "NAME"));
  const plainRefused = await nbdsh(plainUri("m1"), tryModifications);
  assert.match(plainRefused.stdout, /^write EPERM$/m, "the `-` rule grants plain text read-only");

  if (which("qemu-img")) {
    const credentials = join(directory, "qemu-psk");
    await mkdir(credentials, { recursive: true });
    await writeFile(join(credentials, "keys.psk"), await readFile(keys));
    const qemu = (exportName: string) =>
      run("qemu-img", [
        "info",
        "--object",
        `tls-creds-psk,id=tls0,endpoint=client,dir=${credentials},username=backup`,
        "--image-opts",
        `driver=nbd,path=${socket},export=${exportName},tls-creds=tls0`,
      ]);
    const granted = await qemu("m0");
    assert.equal(granted.code, 0, granted.stderr);
    assert.match(granted.stdout, /virtual size: 4 MiB/);
    const qemuHidden = await qemu("m1");
    const qemuAbsent = await qemu("nosuch");
    assert.notEqual(qemuHidden.code, 0);
    assert.equal(qemuHidden.stderr.replaceAll("m1", "NAME"), qemuAbsent.stderr.replaceAll("nosuch", "NAME"));
  } else {
    t.diagnostic("qemu-img absent: its check skipped");
  }
});

void test("serve --access with a bad rules file exits non-zero with one line naming the line", async () => {
  const rules = join(directory, "bad.conf");
  await writeFile(rules, "alice * rw\nbackup disk*@* write\n");
  const result = await runCli([
    "serve",
    "--state-dir",
    join(directory, "bad"),
    "--fuse-mount",
    "none",
    "--access",
    rules,
  ]);
  assert.notEqual(result.code, 0);
  const messages = result.stderr.split("\n").filter((line) => line.startsWith("blocksnap: "));
  assert.equal(messages.length, 1, result.stderr);
  assert.match(messages[0]!, /bad\.conf:2: grant "write": expected ro, rw or none/);
  const missingFile = await runCli([
    "serve",
    "--state-dir",
    join(directory, "bad"),
    "--fuse-mount",
    "none",
    "--access",
    join(directory, "no-such.conf"),
  ]);
  assert.notEqual(missingFile.code, 0);
  assert.match(missingFile.stderr, /cannot read the access file/);
});

/** Polls GET /v1/access (through the CLI) until `done` holds; bounded. */
async function waitForRules(
  daemon: DaemonProcess,
  done: (view: {
    loadedAt: string | null;
    rules: { identity: string; export: string; grant: string }[] | null;
  }) => boolean,
): Promise<void> {
  for (let attempt = 0; attempt < 200; attempt++) {
    const view = await daemon.cliJson<Parameters<typeof done>[0]>(["access", "show"]);
    if (done(view)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.fail("the access rules did not change");
}

void test("reload on SIGHUP and through the API: grants change, granted connections stay up, a bad file changes nothing", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const keys = await pskKeys(["alice", "backup"]);
  const rules = join(directory, "reload.conf");
  await writeFile(rules, "alice * rw\nbackup m0 rw\nbackup m1 ro\n");
  const daemon = await start("reload", ["--tls-psk", keys, "--access", rules]);
  for (const name of ["m0", "m1"]) {
    await daemon.cliOk(["device", "add", name, "--backend", "memory:", "--size", String(4 * MiB)]);
  }
  const uri = (identity: string, exportName: string) =>
    `nbds+unix://${identity}@/${exportName}?socket=${daemon.nbdSocket}&tls-psk-file=${keys}`;
  const sessions: NbdshSession[] = [];
  t.after(() => {
    for (const session of sessions) session.close();
  });
  const open = async (identity: string, exportName: string, mode: "ro" | "rw") => {
    const opened = await NbdshSession.open(uri(identity, exportName));
    sessions.push(opened.session);
    assert.equal(opened.mode, mode, `${identity} on ${exportName}`);
    return opened.session;
  };
  const alice = await open("alice", "m0", "rw");
  const backupWriter = await open("backup", "m0", "rw");
  const backupReader = await open("backup", "m1", "ro");
  assert.equal(await backupWriter.command("write"), "ok");
  assert.equal(await backupReader.command("read"), "ok");
  const shown = await daemon.cliJson<{ loadedAt: string }>(["access", "show"]);

  // SIGHUP: backup loses m1 and keeps m0 read-only.
  await writeFile(rules, "alice * rw\nbackup m0 ro\n");
  daemon.child.kill("SIGHUP");
  await waitForRules(daemon, (view) => view.loadedAt !== shown.loadedAt);
  assert.equal(await alice.command("write"), "ok", "a connection that stays allowed stays up");
  assert.equal(await backupWriter.command("read"), "ok", "rw → ro: the connection stays and reads");
  assert.equal(await backupWriter.command("write"), "EPERM", "rw → ro: later writes get EPERM");
  assert.notEqual(await backupReader.command("read"), "ok", "a removed grant closes the connection");
  const listed = await runOk("nbdinfo", ["--list", uri("backup", "")]);
  assert.deepEqual(exportNames(listed), ["m0"]);

  // A bad file through the API: one-line error, the rules in force stay, nothing is dropped.
  await writeFile(rules, "alice * rw\nbackup m1\n");
  const refused = await daemon.cli(["access", "reload"]);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /reload\.conf:2: expected IDENTITY EXPORT-GLOB/);
  const kept = await daemon.cliJson<{ rules: { identity: string; export: string; grant: string }[] }>([
    "access",
    "show",
  ]);
  assert.deepEqual(
    kept.rules.map(({ identity, export: glob, grant }) => `${identity} ${glob} ${grant}`),
    ["alice * rw", "backup m0 ro"],
  );
  assert.equal(await alice.command("read"), "ok");

  // A good file through the API: backup gets m1 back, for new connections.
  await writeFile(rules, "alice * rw\nbackup m* ro\n");
  const reloaded = await daemon.cliJson<{ rules: unknown[] }>(["access", "reload"]);
  assert.equal(reloaded.rules.length, 2);
  const again = await open("backup", "m1", "ro");
  assert.equal(await again.command("read"), "ok");
  assert.equal(await alice.command("write"), "ok", "alice's connection survived every reload");
  assert.equal(daemon.child.exitCode, null, "the daemon is still running");
});

void test("under --supervise, SIGHUP to the supervisor reloads the engine's rules; status shows TLS and the rules", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const keys = await pskKeys(["alice", "backup"]);
  const rules = join(directory, "supervised.conf");
  await writeFile(rules, "alice * rw\n");
  const daemon = await start("supervised", ["--supervise", "--tls-psk", keys, "--access", rules]);
  await daemon.cliOk(["device", "add", "m0", "--backend", "memory:", "--size", String(4 * MiB)]);
  const status = await daemon.cliJson<StatusView>(["status"]);
  assert.deepEqual(status.nbd.tls, { mode: "require", credentials: ["psk"], verifyPeer: false });
  assert.equal(status.accessRules?.file, rules);
  assert.equal(status.accessRules?.rules, 1);
  assert.ok(
    status.access.whoCanConnect.some((line) => /^nbd unix socket: .*TLS required \(PSK\)$/.test(line)),
  );
  assert.ok(status.access.whoCanConnect.includes(`nbd exports: as the access rules in ${rules} grant`));
  const text = await daemon.cliOk(["status"]);
  assert.match(text, /nbd tls:\s+required on every NBD listener \(PSK\)/);
  assert.match(text, new RegExp(`access rules:\\s+1 rule\\(s\\) from ${rules}`));
  const uri = `nbds+unix://backup@/?socket=${daemon.nbdSocket}&tls-psk-file=${keys}`;
  assert.deepEqual(exportNames(await runOk("nbdinfo", ["--list", uri])), []);

  await writeFile(rules, "alice * rw\nbackup m0 ro\n");
  daemon.child.kill("SIGHUP");
  await waitForRules(daemon, (view) => view.rules?.length === 2);
  assert.deepEqual(exportNames(await runOk("nbdinfo", ["--list", uri])), ["m0"]);
  const after = await daemon.cliJson<StatusView>(["status"]);
  assert.equal(after.pid, status.pid, "the engine reloaded in place: no restart");
  assert.equal(after.accessRules?.rules, 2);
  assert.equal(daemon.child.exitCode, null, "the supervisor is still running");
});
