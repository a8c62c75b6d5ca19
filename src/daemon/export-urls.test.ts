import assert from "node:assert/strict";
import { test } from "node:test";
import { fusePathFor, nbdUrisFor } from "./export-urls.js";

const id = "6f1c0a52-41b3-4c51-9f43-1d1b0a3c2e10";

void test("nbdUrisFor() gives the Unix URI first, then TCP, in the NBD URI format", () => {
  const uris = nbdUrisFor(`disk0@${id}`, {
    nbdSocketPath: "/var/lib/blocksnap/nbd.sock",
    nbdTcp: { host: "127.0.0.1", port: 10809 },
    fuseMountDir: null,
  });
  assert.deepEqual(uris, [
    `nbd+unix:///disk0@${id}?socket=/var/lib/blocksnap/nbd.sock`,
    `nbd://127.0.0.1:10809/disk0@${id}`,
  ]);
});

void test("nbdUrisFor() escapes unsafe characters and brackets IPv6 hosts", () => {
  const uris = nbdUrisFor("disk0", {
    nbdSocketPath: "/tmp/a b&c/nbd.sock",
    nbdTcp: { host: "::1", port: 1 },
    fuseMountDir: null,
  });
  assert.deepEqual(uris, ["nbd+unix:///disk0?socket=/tmp/a%20b%26c/nbd.sock", "nbd://[::1]:1/disk0"]);
});

void test("nbdUrisFor() and fusePathFor() leave out faces that are off", () => {
  const off = { nbdSocketPath: null, nbdTcp: null, fuseMountDir: null };
  assert.deepEqual(nbdUrisFor("disk0", off), []);
  assert.equal(fusePathFor("disk0", off), null);
  assert.equal(fusePathFor(`disk0@${id}`, { ...off, fuseMountDir: "/m" }), `/m/disk0@${id}`);
});

void test("with TLS required the NBD URIs are nbds ones", () => {
  const uris = nbdUrisFor("disk0@s1", {
    nbdSocketPath: "/run/nbd.sock",
    nbdTcp: { host: "::1", port: 10809 },
    fuseMountDir: null,
    nbdTlsRequired: true,
  });
  assert.deepEqual(uris, ["nbds+unix:///disk0@s1?socket=/run/nbd.sock", "nbds://[::1]:10809/disk0@s1"]);
});
