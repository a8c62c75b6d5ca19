import assert from "node:assert/strict";
import { test } from "node:test";
import { InvalidArgumentError } from "commander";
import { parseListenAddress } from "./serve-command.js";

void test("parseListenAddress() reads HOST:PORT, [IPV6]:PORT and none", () => {
  assert.deepEqual(parseListenAddress("127.0.0.1:10809"), { host: "127.0.0.1", port: 10809 });
  assert.deepEqual(parseListenAddress("localhost:0"), { host: "localhost", port: 0 });
  assert.deepEqual(parseListenAddress("[::1]:65535"), { host: "::1", port: 65535 });
  assert.equal(parseListenAddress("none"), "none");
});

void test("parseListenAddress() refuses a missing or out-of-range port and bare IPv6", () => {
  for (const text of [
    "",
    "localhost",
    ":10809",
    "host:",
    "host:65536",
    "host:-1",
    "::1:10809",
    "host:12ab",
  ]) {
    assert.throws(() => parseListenAddress(text), InvalidArgumentError, text);
  }
});
