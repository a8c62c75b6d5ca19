/**
 * The control API's bounds through a real `blocksnap serve`: stalled request bodies and headers are cut
 * by the daemon (408) instead of holding the API; requests beyond the in-flight limit get 503 and the CLI
 * says "daemon busy"; connections beyond the connection limit are dropped and the CLI says "the daemon did
 * not answer" (not `write EPIPE`); hostile JSON and oversized bodies are refused with nothing changed;
 * an EFBIG from the storage is a 400, and 2000 such failing creates leave the daemon's fd count bounded.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { controlConnectionsMax, requestsInFlightMax } from "../../src/daemon/control-server.js";
import { DaemonProcess, runCommand } from "./cli-harness.js";

const waitDeadlineMs = 90_000;

let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-api-limits-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  await daemon.cliOk(["device", "add", "lim0", "--backend", "memory:", "--size", "1M"]);
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

async function state(): Promise<unknown> {
  const status = await daemon.cliJson<StatusView>(["status"]);
  const registry = await readFile(join(daemon.stateDir, "devices.json"), "utf8");
  return { devices: status.devices, snapshots: status.snapshots, registry };
}

/** A raw connection that records what the daemon sends and when it closes. */
class RawConnection {
  received = "";
  closed = false;
  readonly socket: Socket;
  private readonly listeners = new Set<() => void>();

  constructor(socketPath: string, bytes: string) {
    this.socket = connect(socketPath);
    this.socket.setEncoding("latin1");
    this.socket.on("data", (text: string) => {
      this.received += text;
      this.notify();
    });
    this.socket.on("error", () => {});
    this.socket.once("close", () => {
      this.closed = true;
      this.notify();
    });
    this.socket.once("connect", () => this.socket.write(bytes));
  }

  get status(): number | null {
    const match = /^HTTP\/1\.1 (\d{3}) /.exec(this.received);
    return match ? Number(match[1]) : null;
  }

  private notify(): void {
    for (const listener of this.listeners) listener();
  }

  /** Resolves when `done()` holds; rejects after the deadline. */
  until(done: () => boolean, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!done()) return;
        clearTimeout(timer);
        this.listeners.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.listeners.delete(check);
        reject(
          new Error(`${what}: not within ${waitDeadlineMs} ms; received ${JSON.stringify(this.received)}`),
        );
      }, waitDeadlineMs);
      this.listeners.add(check);
      check();
    });
  }
}

/** Waits until `count` of the connections satisfy `done`. */
async function untilCount(
  connections: readonly RawConnection[],
  count: number,
  done: (connection: RawConnection) => boolean,
  what: string,
): Promise<void> {
  const deadline = Date.now() + waitDeadlineMs;
  while (connections.filter(done).length < count) {
    assert.ok(Date.now() < deadline, `${what}: ${connections.filter(done).length} of ${count}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function curl(args: readonly string[]): Promise<{ status: number; body: string }> {
  return runCommand("curl", [
    "--silent",
    "--show-error",
    "--max-time",
    "60",
    "--write-out",
    "\n%{http_code}",
    "--unix-socket",
    daemon.controlSocket,
    ...args,
  ]).then((result) => {
    // 55: curl could not send all of a body the daemon refused early (413 closes the connection).
    assert.ok(result.code === 0 || result.code === 55, `curl ${args.join(" ")}: ${result.stderr}`);
    const newline = result.stdout.lastIndexOf("\n");
    return { status: Number(result.stdout.slice(newline + 1)), body: result.stdout.slice(0, newline) };
  });
}

void test("stalled bodies and headers are cut (408); beyond the in-flight limit the CLI says daemon busy", async () => {
  const before = await state();
  const extra = 6;
  const stalled: RawConnection[] = [];
  for (let index = 0; index < requestsInFlightMax + extra; index++) {
    // A body promised and never sent: the request is in flight from its headers on.
    stalled.push(
      new RawConnection(
        daemon.controlSocket,
        'POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"na',
      ),
    );
  }
  // Headers that never end hold a connection but no request.
  const slowHeaders = new RawConnection(daemon.controlSocket, "GET /v1/status HTTP/1.1\r\nHost: x\r\n");
  await untilCount(stalled, extra, (connection) => connection.status === 503, "503 answers beyond the limit");

  const busy = await daemon.cli(["status"]);
  assert.equal(busy.code, 1, busy.stderr);
  assert.match(busy.stderr, /^blocksnap: daemon busy: .*\(EAGAIN\)$/m);
  assert.doesNotMatch(busy.stderr, /EPIPE/);

  // The daemon cuts every stalled request on its own; then the API answers again.
  await untilCount(stalled, stalled.length, (connection) => connection.closed, "stalled requests closed");
  const statuses = stalled.map((connection) => connection.status);
  assert.equal(statuses.filter((status) => status === 408).length, requestsInFlightMax, String(statuses));
  await slowHeaders.until(() => slowHeaders.closed, "slow headers closed");
  assert.ok(slowHeaders.status === null || slowHeaders.status === 408, slowHeaders.received);
  assert.deepEqual(await state(), before);
});

void test("connections beyond the limit: the CLI says the daemon did not answer, not write EPIPE", async () => {
  const idle: RawConnection[] = [];
  try {
    for (let index = 0; index < controlConnectionsMax + 4; index++) {
      idle.push(new RawConnection(daemon.controlSocket, ""));
    }
    // Node drops the connections beyond its limit at once.
    await untilCount(idle, 4, (connection) => connection.closed, "connections dropped beyond the limit");
    const refused = await daemon.cli(["status"]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, /^blocksnap: the daemon did not answer .* try again \(EAGAIN\)$/m);
  } finally {
    for (const connection of idle) connection.socket.destroy();
  }
  // Once they are gone, the API answers again (bounded retries: the daemon sees the closes soon).
  let answered = false;
  for (let attempt = 0; attempt < 200 && !answered; attempt++) {
    answered = (await daemon.cli(["status"])).code === 0;
    if (!answered) await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(answered, "the API answers again after the idle connections closed");
});

void test("hostile JSON and oversized bodies are refused with 4xx and change nothing", async () => {
  const before = await state();
  const depth = 500_000;
  const bodies: [string, number][] = [
    ["[".repeat(depth) + "]".repeat(depth), 400],
    [`{"name":${"[".repeat(depth)}${"]".repeat(depth)},"backendPath":"memory:"}`, 400],
    ['{"__proto__":{"name":"p"},"backendPath":"memory:","sizeBytes":1048576}', 400],
    ['{"name":"p","backendPath":"memory:","sizeBytes":1e400}', 400],
    ['{"name":"p","backendPath":"memory:","sizeBytes":1048576', 400],
    ['{"name":"p","name":"q","backendPath":"memory:","sizeBytes":-1}', 400],
    [" ".repeat(1024 * 1024 + 1), 413],
  ];
  for (const [body, expected] of bodies) {
    const bodyFile = join(directory, "body.json");
    await writeFile(bodyFile, body);
    const answer = await curl([
      "-X",
      "POST",
      "-H",
      "content-type: application/json",
      "--data-binary",
      `@${bodyFile}`,
      "http://blocksnap/v1/devices",
    ]);
    assert.equal(answer.status, expected, `${body.slice(0, 60)}: ${answer.body}`);
    assert.match(answer.body, /"errno":"E[A-Z]+"/);
  }
  assert.deepEqual(await state(), before);
});

async function daemonFdCount(): Promise<number> {
  return (await readdir(`/proc/${daemon.pid}/fd`)).length;
}

function createSnapshotRaw(body: unknown): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const payload = JSON.stringify(body);
    const request = httpRequest(
      {
        socketPath: daemon.controlSocket,
        path: "/v1/snapshots",
        method: "POST",
        headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(payload) },
        agent: false,
      },
      (response) => {
        let text = "";
        response.setEncoding("utf8").on("data", (chunk: string) => {
          text += chunk;
        });
        response.once("end", () => resolve({ status: response.statusCode ?? 0, text }));
      },
    );
    request.once("error", reject);
    request.end(payload);
  });
}

void test("snapshot create failing with EFBIG answers 400 and leaks no descriptor over 2000 attempts", async (t) => {
  const storage = join(directory, "efbig-storage.img");
  const body = { storage, limitBytes: 2 ** 52, growthPortionBytes: 2 ** 50 };
  const first = await curl([
    "-X",
    "POST",
    "-H",
    "content-type: application/json",
    "--data",
    JSON.stringify(body),
    "http://blocksnap/v1/snapshots",
  ]);
  if (!first.body.includes('"EFBIG"')) {
    t.skip(`the file system of ${directory} does not refuse a 1 PiB file with EFBIG: ${first.body}`);
    return;
  }
  assert.equal(first.status, 400, first.body);
  const cli = await daemon.cli([
    "snapshot",
    "create",
    "--storage",
    storage,
    "--limit",
    "4096T",
    "--growth-portion",
    "1024T",
  ]);
  assert.equal(cli.code, 1, cli.stderr);
  assert.match(cli.stderr, /\(EFBIG\)$/m);
  const before = await state();
  const fdsBefore = await daemonFdCount();
  const attempts = 2000;
  const parallel = 4;
  for (let start = 0; start < attempts; start += parallel) {
    const answers = await Promise.all(Array.from({ length: parallel }, () => createSnapshotRaw(body)));
    for (const answer of answers) assert.equal(answer.status, 400, answer.text);
  }
  const fdsAfter = await daemonFdCount();
  assert.ok(
    fdsAfter <= fdsBefore + 8,
    `descriptors: ${fdsBefore} before, ${fdsAfter} after ${attempts} failures`,
  );
  assert.deepEqual(await state(), before);
});
