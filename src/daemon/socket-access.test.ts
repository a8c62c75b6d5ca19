import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import {
  describeAccess,
  isLoopbackHost,
  plaintextTcpWarning,
  resolveSocketGroup,
  socketMode,
} from "./socket-access.js";

void test("loopback hosts are 127.0.0.0/8, ::1 and localhost; everything else is the network", () => {
  for (const host of ["127.0.0.1", "127.1.2.3", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "localhost"]) {
    assert.equal(isLoopbackHost(host), true, host);
  }
  for (const host of ["0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "128.0.0.1", "example.org", "::2"]) {
    assert.equal(isLoopbackHost(host), false, host);
  }
});

void test("plaintext TCP: loopback warns, the network is refused without --insecure-no-tls", () => {
  assert.match(plaintextTcpWarning({ host: "127.0.0.1", port: 10809 }, false), /every local user/);
  assert.throws(
    () => plaintextTcpWarning({ host: "0.0.0.0", port: 10809 }, false),
    (error: unknown) =>
      error instanceof BlockError && error.errno === "EACCES" && /--insecure-no-tls/.test(error.message),
  );
  assert.match(plaintextTcpWarning({ host: "0.0.0.0", port: 10809 }, true), /every host that can reach it/);
});

void test("socket modes: owner only by default, 0660 with a group", () => {
  assert.equal(socketMode({ group: null }), 0o600);
  assert.equal(socketMode({ group: { gid: 4242, name: "backup" } }), 0o660);
});

void test("--socket-group resolves names and gids through getent, and refuses unknown or odd names", () => {
  assert.deepEqual(resolveSocketGroup("0"), { gid: 0, name: "root" });
  assert.deepEqual(resolveSocketGroup("root"), { gid: 0, name: "root" });
  for (const bad of ["no-such-group-blocksnap", "../x", "a b", ""]) {
    assert.throws(() => resolveSocketGroup(bad), /--socket-group/, bad);
  }
});

void test("status lines say who can connect to each face", () => {
  const lines = describeAccess({
    access: { group: { gid: 34, name: "backup" } },
    nbdSocketPath: "/s/nbd.sock",
    nbdActivation: false,
    nbdTcp: { host: "127.0.0.1", port: 10809 },
  });
  assert.equal(lines.length, 4);
  assert.match(lines[0] ?? "", /^control socket: user \S+ and group backup \(mode 0660\)$/);
  assert.match(lines[1] ?? "", /^nbd unix socket: .*group backup/);
  assert.equal(lines[2], "nbd tcp: every local user, no TLS");
  assert.equal(lines[3], "nbd exports: every export, read-write, to every client that gets in");
  const secured = describeAccess({
    access: { group: null },
    nbdSocketPath: "/s/nbd.sock",
    nbdActivation: false,
    nbdTcp: { host: "192.0.2.1", port: 10809 },
    tls: { mode: "require", credentials: ["x509", "psk"] },
    accessFile: "/etc/blocksnap/access.conf",
  });
  assert.match(secured[1] ?? "", /^nbd unix socket: .*, TLS required \(X\.509 or PSK\)$/);
  assert.equal(secured[2], "nbd tcp: every host that can reach it, TLS required (X.509 or PSK)");
  assert.equal(secured[3], "nbd exports: as the access rules in /etc/blocksnap/access.conf grant");
  const closed = describeAccess({
    access: { group: null },
    nbdSocketPath: null,
    nbdActivation: false,
    nbdTcp: null,
  });
  assert.deepEqual(closed.length, 1);
  assert.match(closed[0] ?? "", /only \(mode 0600\)$/);
});
