/**
 * NBD over TLS (issue 9) through the real daemon and real clients: PSK keys from psktool and X.509
 * certificates from certtool (gnutls-bin) made here; libnbd's nbdinfo/nbdcopy and qemu-img as clients, on
 * the Unix socket and on TCP. Raw-socket probes for the STARTTLS rules of the NBD spec: with `require`,
 * LIST/INFO/GO before TLS get NBD_REP_ERR_TLS_REQD (no export name leaks) and EXPORT_NAME closes; STARTTLS
 * with data gets NBD_REP_ERR_INVALID; garbage instead of a ClientHello, and many connections that stop
 * after STARTTLS, end those connections and nothing else.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import * as tls from "node:tls";
import { DaemonProcess, runCli } from "../cli/cli-harness.js";
import { run, runOk, which } from "../helpers/commands.js";
import { NBD_OPT, RawNbdClient } from "./raw-nbd-client.js";

const NBD_REP_ERR_POLICY = 0x80000002;
const NBD_REP_ERR_INVALID = 0x80000003;
const NBD_REP_ERR_TLS_REQD = 0x80000005;
const NBD_REP_ACK = 1;
const MiB = 1024 * 1024;

let directory = "";
const daemons: DaemonProcess[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-tls-"));
});
after(async () => {
  for (const daemon of daemons) await daemon.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

function missing(): string | undefined {
  for (const tool of ["psktool", "certtool", "nbdinfo", "nbdcopy"]) if (!which(tool)) return `needs ${tool}`;
  return undefined;
}

async function pskFile(name: string, identity: string): Promise<string> {
  const path = join(directory, name);
  await runOk("psktool", ["-u", identity, "-p", path]);
  return path;
}

async function start(name: string, args: readonly string[]): Promise<DaemonProcess> {
  const daemon = await DaemonProcess.start(join(directory, name), {
    args: ["--fuse-mount", "none", ...args],
  });
  daemons.push(daemon);
  await daemon.cliOk(["device", "add", "m0", "--backend", "memory:", "--size", String(8 * MiB)]);
  return daemon;
}

async function afterFlags(socketPath: string): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(socketPath);
  await client.readGreeting();
  client.sendClientFlags(3);
  return client;
}

async function certificates(): Promise<{
  serverDir: string;
  clientDir: string;
  caOnlyDir: string;
  rogueDir: string;
}> {
  const base = join(directory, "x509");
  const clientDir = join(base, "client");
  const caOnlyDir = join(base, "ca-only");
  const rogueDir = join(base, "rogue");
  await mkdir(rogueDir, { recursive: true });
  await mkdir(clientDir, { recursive: true });
  await mkdir(caOnlyDir, { recursive: true });
  const template = async (name: string, lines: string[]) => {
    const path = join(base, `${name}.info`);
    await writeFile(path, `${lines.join("\n")}\n`);
    return path;
  };
  const key = async (name: string) => {
    const path = join(base, `${name}-key.pem`);
    await writeFile(path, await runOk("certtool", ["--generate-privkey"]));
    return path;
  };
  const authority = async (name: string) => {
    const privateKey = await key(name);
    const cert = join(base, `${name}-cert.pem`);
    await runOk("certtool", [
      "--generate-self-signed",
      "--load-privkey",
      privateKey,
      "--template",
      await template(name, [`cn = blocksnap ${name}`, "ca", "cert_signing_key", "expiration_days = 2"]),
      "--outfile",
      cert,
    ]);
    return { privateKey, cert };
  };
  const { privateKey: caKey, cert: caCert } = await authority("ca");
  const signed = async (name: string, lines: string[], issuer = { privateKey: caKey, cert: caCert }) => {
    const privateKey = await key(name);
    const cert = join(base, `${name}-cert.pem`);
    await runOk("certtool", [
      "--generate-certificate",
      "--load-ca-certificate",
      issuer.cert,
      "--load-ca-privkey",
      issuer.privateKey,
      "--load-privkey",
      privateKey,
      "--template",
      await template(name, lines),
      "--outfile",
      cert,
    ]);
    return { privateKey, cert };
  };
  await signed("server", [
    "cn = localhost",
    "dns_name = localhost",
    "ip_address = 127.0.0.1",
    "tls_www_server",
    "encryption_key",
    "signing_key",
    "expiration_days = 2",
  ]);
  const client = await signed("client", [
    "cn = backup",
    "tls_www_client",
    "encryption_key",
    "signing_key",
    "expiration_days = 2",
  ]);
  // Same CN, signed by a CA the server does not trust: must be refused, not taken for `backup`.
  const rogue = await signed(
    "rogue-client",
    ["cn = backup", "tls_www_client", "encryption_key", "signing_key", "expiration_days = 2"],
    await authority("rogue-ca"),
  );
  for (const dir of [clientDir, caOnlyDir, rogueDir]) {
    await writeFile(join(dir, "ca-cert.pem"), await readFile(caCert));
  }
  await writeFile(join(clientDir, "client-cert.pem"), await readFile(client.cert));
  await writeFile(join(clientDir, "client-key.pem"), await readFile(client.privateKey));
  await writeFile(join(rogueDir, "client-cert.pem"), await readFile(rogue.cert));
  await writeFile(join(rogueDir, "client-key.pem"), await readFile(rogue.privateKey));
  return { serverDir: base, clientDir, caOnlyDir, rogueDir };
}

void test("PSK on the Unix socket: libnbd reads and writes over TLS; a wrong key and plain text are refused", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const keys = await pskFile("keys.psk", "alice");
  const wrong = await pskFile("wrong.psk", "alice");
  const daemon = await start("psk", ["--tls-psk", keys]);
  const uri = (file: string) => `nbds+unix://alice@/m0?socket=${daemon.nbdSocket}&tls-psk-file=${file}`;
  const info = await runOk("nbdinfo", [uri(keys)]);
  assert.match(info, /with TLS/);
  assert.match(info, /export-size: 8388608/);
  const data = join(directory, "data.bin");
  await runOk("dd", ["if=/dev/urandom", `of=${data}`, "bs=1M", "count=8", "status=none"]);
  await runOk("nbdcopy", [data, uri(keys)]);
  const back = join(directory, "back.bin");
  await runOk("nbdcopy", [uri(keys), back]);
  assert.ok((await readFile(back)).equals(await readFile(data)), "bytes written over TLS read back");
  const refused = await run("nbdinfo", [uri(wrong)]);
  assert.notEqual(refused.code, 0, "a wrong PSK key fails the handshake");
  const plain = await run("nbdinfo", ["--list", `nbd+unix:///?socket=${daemon.nbdSocket}`]);
  assert.notEqual(plain.code, 0);
  assert.doesNotMatch(plain.stdout, /m0/, "no export name leaks before TLS");
  if (which("qemu-img")) {
    const credentials = join(directory, "qemu-psk");
    await mkdir(credentials, { recursive: true });
    await writeFile(join(credentials, "keys.psk"), await readFile(keys));
    const qemu = await runOk("qemu-img", [
      "info",
      "--object",
      `tls-creds-psk,id=tls0,endpoint=client,dir=${credentials},username=alice`,
      "--image-opts",
      `driver=nbd,path=${daemon.nbdSocket},export=m0,tls-creds=tls0`,
    ]);
    assert.match(qemu, /virtual size: 8 MiB/);
  } else {
    t.diagnostic("qemu-img absent: its PSK check skipped");
  }
});

void test("X.509 on TCP with verify-peer: a client certificate signed by the CA is required; its CN is the identity of the access rules", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const { serverDir, clientDir, caOnlyDir, rogueDir } = await certificates();
  const rules = join(directory, "x509-access.conf");
  await writeFile(rules, "backup m0 ro\n");
  const daemon = await start("x509", [
    "--access",
    rules,
    "--nbd-listen",
    "127.0.0.1:0",
    "--tls-cert",
    join(serverDir, "server-cert.pem"),
    "--tls-key",
    join(serverDir, "server-key.pem"),
    "--tls-ca",
    join(serverDir, "ca-cert.pem"),
    "--tls-verify-peer",
  ]);
  const status = await daemon.cliJson<{ nbd: { tcp: { port: number } } }>(["status"]);
  const port = status.nbd.tcp.port;
  const ok = await runOk("nbdinfo", [`nbds://localhost:${port}/m0?tls-certificates=${clientDir}`]);
  assert.match(ok, /with TLS/);
  assert.match(ok, /is_read_only: true/, "the certificate's CN `backup` has an ro grant");
  await daemon.cliOk(["device", "add", "m1", "--backend", "memory:", "--size", String(MiB)]);
  const listed = await runOk("nbdinfo", [
    "--list",
    `nbds://localhost:${port}/?tls-certificates=${clientDir}`,
  ]);
  assert.match(listed, /export="m0"/);
  assert.doesNotMatch(listed, /m1/, "no rule for m1: not listed");
  if (which("qemu-img")) {
    const qemu = (exportName: string) =>
      run("qemu-img", [
        "info",
        "--object",
        `tls-creds-x509,id=tls0,endpoint=client,dir=${clientDir}`,
        "--image-opts",
        `driver=nbd,host=localhost,port=${port},export=${exportName},tls-creds=tls0`,
      ]);
    const granted = await qemu("m0");
    assert.equal(granted.code, 0, granted.stderr);
    assert.match(granted.stdout, /virtual size: 8 MiB/);
    const hidden = await qemu("m1");
    const absent = await qemu("nosuch");
    assert.notEqual(hidden.code, 0);
    assert.equal(hidden.stderr.replaceAll("m1", "NAME"), absent.stderr.replaceAll("nosuch", "NAME"));
  } else {
    t.diagnostic("qemu-img absent: its X.509 check skipped");
  }
  const noClientCert = await run("nbdinfo", [`nbds://localhost:${port}/m0?tls-certificates=${caOnlyDir}`]);
  assert.notEqual(noClientCert.code, 0, "no client certificate: refused");
  const untrusted = await run("nbdinfo", [`nbds://localhost:${port}/m0?tls-certificates=${rogueDir}`]);
  assert.notEqual(untrusted.code, 0, "a client certificate from another CA: refused");
  assert.doesNotMatch(untrusted.stdout, /export-size/);
  // gnutls does not even send a certificate the server's CA list does not name; Node's client does. The
  // server must refuse it after the handshake (Node only checks this on sockets a tls.Server made).
  const trusted = await listOverNodeTls(daemon.nbdSocket, clientDir);
  assert.deepEqual(trusted, ["m0"], "Node's client with the good certificate lists what `backup` may use");
  const rogue = await listOverNodeTls(daemon.nbdSocket, rogueDir);
  assert.equal(rogue, "closed", "a certificate from another CA, sent anyway: the connection is closed");
});

void test("STARTTLS rules and hostile handshakes: TLS_REQD, close on EXPORT_NAME, garbage ClientHello, half-open floods", async (t) => {
  const reason = missing();
  if (reason) return t.skip(reason);
  const keys = await pskFile("probe.psk", "alice");
  // 100 half-open connections from one uid: above the default per-client share (64), so it is raised here.
  const daemon = await start("probes", [
    "--tls",
    "require",
    "--tls-psk",
    keys,
    "--max-connections-per-client",
    "256",
  ]);
  const socket = daemon.nbdSocket;

  const client = await afterFlags(socket);
  for (const option of [NBD_OPT.LIST, NBD_OPT.INFO, NBD_OPT.GO, NBD_OPT.STRUCTURED_REPLY]) {
    client.sendOption(
      option,
      option === NBD_OPT.LIST || option === NBD_OPT.STRUCTURED_REPLY ? Buffer.alloc(0) : exportRequest("m0"),
    );
    const reply = await client.readOptionReply();
    assert.equal(reply.type, NBD_REP_ERR_TLS_REQD, `option ${option} before TLS`);
  }
  client.sendOption(NBD_OPT.STARTTLS, Buffer.from("x"));
  assert.equal((await client.readOptionReply()).type, NBD_REP_ERR_INVALID, "STARTTLS with data");
  client.sendOption(NBD_OPT.EXPORT_NAME, Buffer.from("m0"));
  assert.equal(await client.waitForServerClose(), true, "EXPORT_NAME before TLS closes");

  const garbage = await afterFlags(socket);
  garbage.sendOption(NBD_OPT.STARTTLS);
  assert.equal((await garbage.readOptionReply()).type, NBD_REP_ACK);
  garbage.write(Buffer.alloc(512, 0x41));
  assert.equal(await garbage.waitForServerClose(), true, "garbage instead of a ClientHello closes");

  const halfOpen: RawNbdClient[] = [];
  for (let index = 0; index < 100; index++) {
    const idle = await afterFlags(socket);
    idle.sendOption(NBD_OPT.STARTTLS);
    assert.equal((await idle.readOptionReply()).type, NBD_REP_ACK);
    halfOpen.push(idle);
  }
  const stillServing = await runOk("nbdinfo", [
    `nbds+unix://alice@/m0?socket=${socket}&tls-psk-file=${keys}`,
  ]);
  assert.match(stillServing, /with TLS/, "the daemon serves while 100 connections sit after STARTTLS");
  for (const idle of halfOpen) idle.destroy();

  const plainDaemon = await start("plain", []);
  const off = await afterFlags(plainDaemon.nbdSocket);
  off.sendOption(NBD_OPT.STARTTLS);
  assert.equal((await off.readOptionReply()).type, NBD_REP_ERR_POLICY, "STARTTLS without TLS configured");
  off.destroy();
});

void test("serve: --tls require without credentials, or a bad PSK file, is a one-line error", async () => {
  const none = await runCli([
    "serve",
    "--state-dir",
    join(directory, "bad1"),
    "--fuse-mount",
    "none",
    "--tls",
    "require",
  ]);
  assert.equal(none.code, 1);
  assert.match(none.stderr, /needs credentials/);
  const badFile = join(directory, "bad.psk");
  await writeFile(badFile, "no colon here\n");
  const bad = await runCli([
    "serve",
    "--state-dir",
    join(directory, "bad2"),
    "--fuse-mount",
    "none",
    "--tls-psk",
    badFile,
  ]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /psktool format/);
});

/**
 * STARTTLS by hand, then Node's TLS client with the certificate in `dir`, then NBD_OPT_LIST inside TLS:
 * the export names, or `closed` when the server ends the connection instead of answering.
 */
async function listOverNodeTls(socketPath: string, dir: string): Promise<string[] | "closed"> {
  const plain = net.connect(socketPath);
  await once(plain, "connect");
  let received = Buffer.alloc(0);
  const waitFor = (bytes: number) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (received.byteLength < bytes) return;
        plain.off("data", onData);
        plain.off("close", onClose);
        resolve();
      };
      const onData = (chunk: Buffer) => {
        received = Buffer.concat([received, chunk]);
        check();
      };
      const onClose = () => reject(new Error("closed during the plain-text handshake"));
      plain.on("data", onData);
      plain.on("close", onClose);
      check();
    });
  await waitFor(18);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3, 0);
  plain.write(Buffer.concat([flags, optionBytes(NBD_OPT.STARTTLS)]));
  await waitFor(18 + 20);
  assert.equal(received.readUInt32BE(18 + 12), NBD_REP_ACK, "STARTTLS acknowledged");
  plain.pause();
  const secure = tls.connect({
    socket: plain,
    cert: await readFile(join(dir, "client-cert.pem")),
    key: await readFile(join(dir, "client-key.pem")),
    rejectUnauthorized: false,
  });
  secure.on("error", () => {});
  let answer = Buffer.alloc(0);
  const result = new Promise<string[] | "closed">((resolve) => {
    secure.on("data", (chunk: Buffer) => {
      answer = Buffer.concat([answer, chunk]);
      const names: string[] = [];
      for (let at = 0; at + 20 <= answer.byteLength; ) {
        const type = answer.readUInt32BE(at + 12);
        const length = answer.readUInt32BE(at + 16);
        if (at + 20 + length > answer.byteLength) return;
        if (type === 2)
          names.push(answer.subarray(at + 24, at + 24 + answer.readUInt32BE(at + 20)).toString());
        if (type === NBD_REP_ACK) resolve(names);
        at += 20 + length;
      }
    });
    secure.once("close", () => resolve("closed"));
  });
  secure.once("secureConnect", () => secure.write(optionBytes(NBD_OPT.LIST)));
  const outcome = await result;
  secure.destroy();
  return outcome;
}

function optionBytes(option: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(0x49484156454f5054n, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(payload.byteLength, 12);
  return Buffer.concat([header, payload]);
}

function exportRequest(name: string): Buffer {
  const nameBytes = Buffer.from(name);
  const payload = Buffer.alloc(4 + nameBytes.length + 2);
  payload.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(payload, 4);
  payload.writeUInt16BE(0, 4 + nameBytes.length);
  return payload;
}
