/**
 * NBD access rules (serve --access, issue 9 item 3) through the real daemon and real clients: two PSK
 * identities from psktool, one granted read-write and one read-only; libnbd's nbdinfo/nbdcopy/nbdsh and
 * qemu-img as clients. An `ro` identity reads, its WRITE/TRIM/WRITE_ZEROES get EPERM and the backend file
 * stays byte for byte; an export it may not use is absent from LIST and fails exactly like an export that
 * does not exist; plain-text clients follow the `-` rules. A bad access file stops serve with one line.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
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
import errno
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
        print(name, errno.errorcode.get(error.errno, error.errno))
`;

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
