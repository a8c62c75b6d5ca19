import assert from "node:assert/strict";
import { test } from "node:test";
import { IoStats, ioOpIndex, latencyBucketsSeconds } from "./io-stats.js";
import { TextWriter } from "./text-format.js";

void test("TextWriter escapes label values and help, and prints +Inf and NaN as Prometheus does", () => {
  const writer = new TextWriter();
  writer.family("x_bytes", "gauge", "a\\b\nc").sample({ device: 'a"b\\c\nd' }, Number.NaN);
  writer.family("y_total", "counter", "y").sample({}, Number.POSITIVE_INFINITY);
  assert.equal(
    writer.text(),
    [
      "# HELP x_bytes a\\\\b\\nc",
      "# TYPE x_bytes gauge",
      'x_bytes{device="a\\"b\\\\c\\nd"} NaN',
      "# HELP y_total y",
      "# TYPE y_total counter",
      "y_total +Inf",
      "",
    ].join("\n"),
  );
});

void test("TextWriter refuses a family declared twice and a sample before its family", () => {
  const writer = new TextWriter();
  assert.throws(() => writer.sample({}, 1));
  writer.family("z", "gauge", "z");
  assert.throws(() => writer.family("z", "gauge", "z"));
  assert.throws(() => writer.sample({}, 1, "_bucket"), "a gauge has no buckets");
});

void test("IoStats: a request falls in the first bucket whose bound it does not exceed; buckets cumulate", () => {
  const stats = new IoStats();
  stats.record(ioOpIndex.write, 4096, 0.00005, false);
  stats.record(ioOpIndex.write, 4096, 0.00006, false);
  stats.record(ioOpIndex.write, 4096, 11, true);
  const cumulative = stats.cumulativeBuckets(ioOpIndex.write);
  assert.equal(cumulative.length, latencyBucketsSeconds.length + 1);
  assert.equal(cumulative[0], 1);
  assert.equal(cumulative[1], 2);
  assert.equal(cumulative[latencyBucketsSeconds.length - 1], 2);
  assert.equal(cumulative[latencyBucketsSeconds.length], 3);
  assert.equal(stats.requests[ioOpIndex.write], 3);
  assert.equal(stats.bytes[ioOpIndex.write], 8192, "a failed request moves no bytes");
  assert.equal(stats.errors[ioOpIndex.write], 1);
  assert.equal(stats.requests[ioOpIndex.read], 0);
});
