import assert from "node:assert/strict";
import { test } from "node:test";
import { formatSize, parseCount, parseRange, parseSize, UnitSyntaxError } from "./units.js";

void test("parseSize() reads plain bytes and K/M/G/T as powers of 1024", () => {
  assert.equal(parseSize("0"), 0);
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("64K"), 64 * 1024);
  assert.equal(parseSize("64k"), 64 * 1024);
  assert.equal(parseSize("3M"), 3 * 1024 ** 2);
  assert.equal(parseSize("2G"), 2 * 1024 ** 3);
  assert.equal(parseSize("5T"), 5 * 1024 ** 4);
  assert.equal(parseSize("4KiB"), 4096);
  assert.equal(parseSize("4KB"), 4096);
  assert.equal(parseSize("512B"), 512);
});

void test("parseSize() refuses fractions, signs, unknown suffixes and values beyond 2^53", () => {
  for (const text of ["", "K", "1.5M", "-1", "+1", "1P", "12X", "0x10", "1 M", "1IB", "8192T"]) {
    assert.throws(() => parseSize(text), UnitSyntaxError, text);
  }
  assert.equal(parseSize("8191T"), 8191 * 1024 ** 4);
});

void test("parseRange() reads OFFSET:LENGTH with suffixes", () => {
  assert.deepEqual(parseRange("0:4096"), { offsetBytes: 0, lengthBytes: 4096 });
  assert.deepEqual(parseRange("1M:64K"), { offsetBytes: 1024 ** 2, lengthBytes: 64 * 1024 });
});

void test("parseRange() refuses a missing part, a zero length and extra colons", () => {
  for (const text of ["", "4096", ":4096", "0:", "0:0", "1:2:3", "a:b", "8191T:2T"]) {
    assert.throws(() => parseRange(text), UnitSyntaxError, text);
  }
});

void test("parseCount() takes plain integers within the bound", () => {
  assert.equal(parseCount("0", "timeout", 10), 0);
  assert.equal(parseCount("10", "timeout", 10), 10);
  for (const text of ["11", "1K", "-1", "1.0", ""])
    assert.throws(() => parseCount(text, "timeout", 10), UnitSyntaxError);
});

void test("formatSize() prints exact units, else one decimal", () => {
  assert.equal(formatSize(0), "0 B");
  assert.equal(formatSize(1023), "1023 B");
  assert.equal(formatSize(1024), "1 KiB");
  assert.equal(formatSize(64 * 1024 ** 2), "64 MiB");
  assert.equal(formatSize(1.5 * 1024 ** 3), "1.5 GiB");
  assert.equal(formatSize(3 * 1024 ** 4), "3 TiB");
  assert.equal(parseSize(formatSize(256 * 1024).replace(" KiB", "K")), 256 * 1024);
});
