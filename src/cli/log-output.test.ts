import assert from "node:assert/strict";
import { test } from "node:test";
import { chooseLogOutput, formatLogLine } from "./log-output.js";

void test("chooseLogOutput(): --json wins, else human lines on a terminal and JSON elsewhere", () => {
  assert.equal(chooseLogOutput(true, true), "json-stdout");
  assert.equal(chooseLogOutput(true, false), "json-stdout");
  assert.equal(chooseLogOutput(false, true), "pretty-stderr");
  assert.equal(chooseLogOutput(false, false), "json-stderr");
});

void test("formatLogLine() shows time, level, message and the record's own fields", () => {
  const time = new Date(2026, 0, 2, 3, 4, 5, 6).getTime();
  const line = JSON.stringify({
    level: 40,
    time,
    pid: 7,
    hostname: "h",
    signal: "SIGTERM",
    mounted: ["/mnt/a (ext4)"],
    err: { message: "no such file", stack: "…" },
    msg: "stop requested",
  });
  assert.equal(
    formatLogLine(`${line}\n`, false),
    '03:04:05.006 WARN  stop requested signal=SIGTERM mounted=["/mnt/a (ext4)"] err="no such file"',
  );
  const colored = formatLogLine(JSON.stringify({ level: 50, time, msg: "m" }), true);
  assert.ok(colored.endsWith("\u001b[31mERROR\u001b[0m m"), JSON.stringify(colored));
});

void test("formatLogLine() passes on what is not a pino record", () => {
  assert.equal(formatLogLine("not json\n", false), "not json");
  assert.equal(formatLogLine("[1,2]", false), "[1,2]");
});
