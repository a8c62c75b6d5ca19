/**
 * Fuzzes the control API of a real `blocksnap serve` over its Unix socket with raw bytes: request lines,
 * methods, targets, headers, bodies and hostile JSON, a few connections at a time. Every answer must be a
 * 4xx (a GET may also read successfully), never a 5xx; the daemon must stay up and its state (the status
 * view and devices.json) must not change. Seeded (BLOCKSNAP_SEED replays a run) and bounded: a fixed
 * number of cases, each with its own deadline.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { Prng } from "../helpers/prng.js";
import { DaemonProcess } from "./cli-harness.js";

const casesCount = 400;
const parallelConnections = 4;
const caseDeadlineMs = 20_000;

let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-api-fuzz-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  await daemon.cliOk(["device", "add", "fz0", "--backend", "memory:", "--size", "1M"]);
  await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--device", "fz0"]);
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

interface FuzzCase {
  readonly method: string;
  readonly bytes: Buffer;
}

interface Answer {
  readonly statuses: number[];
  readonly raw: string;
}

/** Sends raw bytes, half-closes, and collects whatever comes back until the daemon closes. */
function exchange(socketPath: string, bytes: Buffer): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const socket = connect(socketPath);
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no end of answer within ${caseDeadlineMs} ms`));
    }, caseDeadlineMs);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.once("error", () => {
      // A reset after the daemon answered and closed is fine; what was read is judged below.
    });
    socket.once("close", () => {
      clearTimeout(timer);
      const raw = Buffer.concat(chunks).toString("latin1");
      const statuses = [...raw.matchAll(/^HTTP\/1\.[01] (\d{3}) /gm)].map((match) => Number(match[1]));
      resolve({ statuses, raw });
    });
    socket.once("connect", () => {
      socket.write(bytes, () => socket.end());
    });
  });
}

const methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "get"];
const badMethods = ["", "G ET", "POST\x00", "X".repeat(300), "\xff\xfe", "GET\t"];
const segments = [
  "",
  "..",
  ".",
  "%2e%2e",
  "%",
  "%zz",
  "%00",
  "a%2Fb",
  "-rf",
  "\x01",
  "a b",
  "ü",
  "x".repeat(5000),
  "%C0%AF",
  "00000000-0000-0000-0000-000000000000",
  "nope",
  "__proto__",
  "constructor",
];
const fixedTargets = [
  "//[",
  "//x/v1/status",
  "//",
  "*",
  "http://x/v1/status",
  "http://[/",
  "v1/status",
  "",
  "/v1/status?%",
  "/v1/status?a=1&a=2",
  "/v1/snapshots/x/event?timeoutMs=-1",
  "/v1/snapshots/x/event?timeoutMs=1e400",
  "/v1/devices/x/cbt/map?format=evil",
  "/\x00",
  `/v1/${"a/".repeat(2000)}`,
];
const routeTemplates = [
  "/v1/status",
  "/v1/devices",
  "/v1/devices/S",
  "/v1/devices/S/cbt",
  "/v1/devices/S/cbt/map",
  "/v1/devices/S/cbt/mark-dirty",
  "/v1/snapshots",
  "/v1/snapshots/S",
  "/v1/snapshots/S/devices",
  "/v1/snapshots/S/storage",
  "/v1/snapshots/S/take",
  "/v1/snapshots/S/event",
  "/v2/status",
  "/v1",
];
const hostileJson = (random: Prng): string => {
  const depth = random.int(1, 200_000);
  return random.pick([
    () => "[".repeat(depth) + "]".repeat(depth),
    () => `{"name":${"[".repeat(depth)}${"]".repeat(depth)}}`,
    () => '{"name":"a","backendPath":"memory:","sizeBytes":1e400}',
    () => '{"__proto__":{"polluted":true},"name":"p"}',
    () => '{"constructor":{"prototype":{"x":1}}}',
    () => '{"name":"a\\u0000b","backendPath":"memory:"}',
    () => '{"name":"../etc","backendPath":"memory:","sizeBytes":-1}',
    () => '{"storage":"memory:","limitBytes":9007199254740993}',
    () => '{"storage":"memory:","limitBytes":"1M"}',
    () => '{"ranges":[{"offsetBytes":-1,"lengthBytes":0}]}',
    () => '{"ranges":"x"}',
    () => '{"noFreeze":"yes","freezeTimeoutMs":0}',
    () => '{"device":null}',
    () => `{"a":"${"x".repeat(random.int(0, 200_000))}"`,
    () => '"just a string"',
    () => "null",
    () => "12",
    () => "{}{}",
    () => "\ufeff{}",
    () => `{${'"k":1,'.repeat(random.int(1, 50_000))}"k":2}`,
  ])();
};

function randomTarget(random: Prng): string {
  if (random.chance(0.3)) return random.pick(fixedTargets);
  let target = random.pick(routeTemplates).replace("S", random.pick(segments));
  if (random.chance(0.2))
    target += `?${random.pick(["", "x=1", "timeoutMs=5", "format=base64", "%=%", "&&"])}`;
  return target;
}

function randomHeaders(random: Prng, bodyBytes: number): string[] {
  const headers: string[] = [];
  if (random.chance(0.9)) headers.push("Host: x");
  const lengthHeader = random.pick([
    `Content-Length: ${bodyBytes}`,
    `Content-Length: ${bodyBytes}`,
    `Content-Length: ${bodyBytes}`,
    "Content-Length: -1",
    "Content-Length: abc",
    "Content-Length: 99999999999999999999",
    `Content-Length: ${bodyBytes}\r\nContent-Length: ${bodyBytes + 1}`,
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "",
  ]);
  if (lengthHeader !== "") headers.push(lengthHeader);
  const extras = [
    "Content-Type: application/json",
    "Content-Type: text/plain",
    "Expect: 100-continue",
    "Connection: keep-alive",
    "Connection: close",
    "Upgrade: websocket\r\nConnection: Upgrade",
    `X-Long: ${"y".repeat(random.int(1, 20_000))}`,
    "NoColonHere",
    " folded: continuation",
    "Bad\x00Header: 1",
    "X-Ctl: \x01\x02",
    ": empty-name",
  ];
  const extraCount = random.int(0, 3);
  for (let index = 0; index < extraCount; index++) headers.push(random.pick(extras));
  return headers;
}

function randomCase(random: Prng): FuzzCase {
  const method = random.chance(0.9) ? random.pick(methods) : random.pick(badMethods);
  const target = randomTarget(random);
  const version = random.chance(0.92)
    ? "HTTP/1.1"
    : random.pick(["HTTP/1.0", "HTTP/2.0", "HTTP/9", "", "FTP/1.1"]);
  let body: Buffer;
  const bodyKind = random.int(0, 3);
  if (bodyKind === 0) body = Buffer.alloc(0);
  else if (bodyKind === 1) body = Buffer.from(random.bytes(random.int(1, 4096)));
  else if (bodyKind === 2) body = Buffer.from(hostileJson(random), "utf8");
  else body = Buffer.alloc(random.int(1024 * 1024, 1024 * 1024 + 65536), 0x20);
  const headers = randomHeaders(random, body.byteLength);
  const chunked = headers.some((header) => header.startsWith("Transfer-Encoding"));
  if (chunked && random.chance(0.7)) {
    body = Buffer.concat([
      Buffer.from(`${random.pick([body.byteLength.toString(16), "zz", "-1", "ffffffffffffffff"])}\r\n`),
      body,
      Buffer.from("\r\n0\r\n\r\n"),
    ]);
  }
  const lineEnd = random.chance(0.95) ? "\r\n" : "\n";
  const head = `${method} ${target} ${version}${lineEnd}${headers.map((header) => header + lineEnd).join("")}${lineEnd}`;
  let bytes = Buffer.concat([Buffer.from(head, "latin1"), body]);
  if (random.chance(0.05)) bytes = bytes.subarray(0, random.int(0, bytes.byteLength));
  return { method, bytes };
}

async function state(): Promise<unknown> {
  const status = await daemon.cliJson<StatusView>(["status"]);
  const registry = await readFile(join(daemon.stateDir, "devices.json"), "utf8");
  return {
    devices: status.devices,
    unavailable: status.devicesUnavailable,
    snapshots: status.snapshots,
    registry,
  };
}

void test("fuzzed control requests get 4xx answers, the daemon stays up and nothing changes", async () => {
  const random = Prng.fromEnvironment();
  const before = await state();
  const cases: FuzzCase[] = [
    { method: "GET", bytes: Buffer.from("GET //[ HTTP/1.1\r\nHost: x\r\n\r\n") },
    { method: "GET", bytes: Buffer.from("GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n") },
  ];
  while (cases.length < casesCount) cases.push(randomCase(random));
  const failures: string[] = [];
  let answered = 0;
  for (let start = 0; start < cases.length; start += parallelConnections) {
    const batch = cases.slice(start, start + parallelConnections);
    await Promise.all(
      batch.map(async (fuzzCase, offset) => {
        const index = start + offset;
        const answer = await exchange(daemon.controlSocket, fuzzCase.bytes);
        if (answer.statuses.length > 0) answered++;
        for (const status of answer.statuses) {
          const readOnly = fuzzCase.method === "GET" || fuzzCase.method === "HEAD";
          const informational = status >= 100 && status < 200;
          const refused = status >= 400 && status < 500;
          const read = readOnly && status >= 200 && status < 300;
          const allowed = informational || refused || read;
          if (!allowed) {
            failures.push(
              `case ${index}: HTTP ${status} for ${JSON.stringify(fuzzCase.bytes.subarray(0, 200).toString("latin1"))}: ${answer.raw.slice(0, 300)}`,
            );
          }
        }
      }),
    );
    assert.equal(daemon.child.exitCode, null, `the daemon exited at case ${start} (seed ${random.seed})`);
    assert.equal(
      daemon.child.signalCode,
      null,
      `the daemon was killed at case ${start} (seed ${random.seed})`,
    );
  }
  assert.deepEqual(failures, [], `seed ${random.seed}`);
  assert.ok(
    answered > casesCount / 2,
    `only ${answered} of ${casesCount} cases were answered (seed ${random.seed})`,
  );
  assert.deepEqual(await state(), before, `seed ${random.seed}`);
});
