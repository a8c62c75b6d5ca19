import assert from "node:assert/strict";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError } from "../block/errors.js";
import type { CbtInfo } from "../cbt/cbt-map.js";
import type {
  ByteRange,
  DeviceAddOptions,
  DeviceInfo,
  SnapshotCreateOptions,
  SnapshotInfo,
} from "../engine/engine-types.js";
import { EventLog, type EventRead } from "../engine/event-log.js";
import type { StorageInfo } from "../storage/diff-storage.js";
import { silentLogger } from "../util/logger.js";
import type { ControlEngine } from "./control-engine.js";
import { ControlServer, requestBodyBytesMax } from "./control-server.js";
import { DeviceRegistry } from "./device-registry.js";

/** An engine double: keeps devices and snapshots in maps and fails like the real Engine's contract says. */
class FakeEngine implements ControlEngine {
  readonly devices = new Map<string, DeviceInfo>();
  readonly snapshots = new Map<string, SnapshotInfo>();
  readonly markedRanges: ByteRange[] = [];
  readonly events = new EventLog();
  map = new Uint8Array([0, 1, 2, 255]);

  async addDevice(options: DeviceAddOptions): Promise<DeviceInfo> {
    if (this.devices.has(options.name))
      throw new BlockError("EEXIST", `Device ${options.name} already exists`);
    const sizeBytes = options.sizeBytes ?? 1024 * 1024;
    const info: DeviceInfo = {
      name: options.name,
      backendPath: options.backendPath,
      sizeBytes,
      snapshotId: null,
      cbt: {
        blockSizeBytes: 65536,
        deviceSizeBytes: sizeBytes,
        blockCount: 16,
        generationId: "g",
        changesNumber: 0,
        generationReason: "attached",
        generationStartedAt: "2026-01-01T00:00:00.000Z",
      },
    };
    this.devices.set(options.name, info);
    return info;
  }
  async removeDevice(name: string): Promise<void> {
    this.deviceInfo(name);
    this.devices.delete(name);
  }
  listDevices(): DeviceInfo[] {
    return [...this.devices.values()];
  }
  deviceInfo(name: string): DeviceInfo {
    const info = this.devices.get(name);
    if (info === undefined) throw new BlockError("ENOENT", `No device ${name}`);
    return info;
  }
  cbtInfo(name: string): CbtInfo {
    return this.deviceInfo(name).cbt;
  }
  cbtRead(name: string): Uint8Array {
    this.deviceInfo(name);
    return this.map;
  }
  cbtState(name: string): never {
    throw new BlockError("ENOSYS", `the fake engine keeps no CBT state for ${name}`);
  }
  async cbtMarkDirty(name: string, ranges: readonly ByteRange[]): Promise<void> {
    this.deviceInfo(name);
    this.markedRanges.push(...ranges);
  }
  async createSnapshot(options: SnapshotCreateOptions): Promise<SnapshotInfo> {
    for (const name of options.devices ?? []) this.deviceInfo(name);
    const id = `snap-${this.snapshots.size + 1}`;
    const storage: StorageInfo = {
      kind: "memory",
      paths: [options.storage],
      usedBytes: 0,
      capacityBytes: 0,
      limitBytes: options.limitBytes,
    };
    const info: SnapshotInfo = {
      id,
      state: "created",
      createdAtMs: 1,
      takenAtMs: null,
      takeStallMs: null,
      takeReport: null,
      chunkSizeBytes: options.chunkSizeBytes ?? 262144,
      onCowError: options.onCowError ?? "break-snapshot",
      storage,
      devices: (options.devices ?? []).map((name) => ({
        name,
        imageName: null,
        sizeBytes: this.deviceInfo(name).sizeBytes,
        chunksStored: 0,
        chunksCopied: 0,
        copiedBytes: 0,
        error: null,
      })),
    };
    this.snapshots.set(id, info);
    return info;
  }
  addDeviceToSnapshot(id: string, deviceName: string): void {
    this.snapshotInfo(id);
    this.deviceInfo(deviceName);
  }
  async appendStorage(id: string, _options: unknown): Promise<StorageInfo> {
    return this.snapshotInfo(id).storage;
  }
  async takeSnapshot(id: string): Promise<SnapshotInfo> {
    const info = this.snapshotInfo(id);
    if (info.state !== "created") throw new BlockError("EALREADY", `Snapshot ${id} is already taken`);
    const taken: SnapshotInfo = {
      ...info,
      state: "taken",
      takenAtMs: 2,
      takeStallMs: 0.5,
      devices: info.devices.map((device) => ({ ...device, imageName: `${device.name}@${id}` })),
    };
    this.snapshots.set(id, taken);
    return taken;
  }
  snapshotInfo(id: string): SnapshotInfo {
    const info = this.snapshots.get(id);
    if (info === undefined) throw new BlockError("ESRCH", `No snapshot ${id}`);
    return info;
  }
  listSnapshots(): SnapshotInfo[] {
    return [...this.snapshots.values()];
  }
  async readEvent(id: string, since: number | null, timeoutMs: number): Promise<EventRead> {
    this.snapshotInfo(id);
    const read = this.events.read(since);
    if (read.event !== null) return read;
    // Unref: a poll abandoned by the shutdown test must not keep the test process alive.
    await new Promise((resolve) => setTimeout(resolve, timeoutMs).unref());
    return read;
  }
  async destroySnapshot(id: string): Promise<void> {
    this.snapshotInfo(id);
    this.snapshots.delete(id);
  }
}

interface Reply {
  readonly status: number;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly body: Buffer;
  json(): { error?: { errno: string; message: string } } & Record<string, unknown>;
}

function send(socketPath: string, method: string, path: string, body?: string | Buffer): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ socketPath, method, path, agent: false }, (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.once("end", () => {
        const bodyBuffer = Buffer.concat(chunks);
        resolve({
          status: response.statusCode ?? 0,
          headers: response.headers,
          body: bodyBuffer,
          json: () => JSON.parse(bodyBuffer.toString("utf8")),
        });
      });
    });
    request.once("error", reject);
    if (body !== undefined) request.setHeader("Content-Type", "application/json");
    request.end(body);
  });
}

let directory = "";
let socketPath = "";
let engine: FakeEngine;
let server: ControlServer;
const shutdown = new AbortController();

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-control-"));
  socketPath = join(directory, "control.sock");
  engine = new FakeEngine();
  const registry = new DeviceRegistry(join(directory, "devices.json"), engine, silentLogger);
  server = await ControlServer.listen({
    socketPath,
    logger: silentLogger,
    context: {
      engine,
      registry,
      identity: {
        pid: process.pid,
        version: "9.9.9",
        stateDir: directory,
        controlSocket: socketPath,
        access: { socketMode: "0600", socketGroup: null, whoCanConnect: ["control socket: user root only"] },
      },
      addresses: {
        nbdSocketPath: "/s/nbd.sock",
        nbdTcp: { host: "127.0.0.1", port: 10809 },
        fuseMountDir: "/m",
      },
      shutdownSignal: shutdown.signal,
    },
  });
});

after(async () => {
  await server.close();
  await rm(directory, { recursive: true, force: true });
});

void test("the control socket is mode 0600", async () => {
  assert.equal((await stat(socketPath)).mode & 0o777, 0o600);
});

void test("GET /v1/status reports identity and addresses", async () => {
  const reply = await send(socketPath, "GET", "/v1/status");
  assert.equal(reply.status, 200);
  const status = reply.json();
  assert.equal(status.pid, process.pid);
  assert.equal(status.version, "9.9.9");
  assert.deepEqual(status.nbd, {
    socketPath: "/s/nbd.sock",
    tcp: { host: "127.0.0.1", port: 10809 },
    tls: { mode: "off", credentials: [], verifyPeer: false },
  });
  assert.equal(status.accessRules, null, "no access rules in this context");
  assert.deepEqual(status.fuse, { mountDir: "/m" });
});

void test("POST /v1/devices adds a device with its URIs; a second add of the name is 409 EEXIST", async () => {
  const body = JSON.stringify({ name: "disk0", backendPath: "/d/disk0.img", sizeBytes: 4096 });
  const reply = await send(socketPath, "POST", "/v1/devices", body);
  assert.equal(reply.status, 201);
  const view = reply.json();
  assert.equal(view.name, "disk0");
  assert.deepEqual(view.nbdUris, ["nbd+unix:///disk0?socket=/s/nbd.sock", "nbd://127.0.0.1:10809/disk0"]);
  assert.equal(view.fusePath, "/m/disk0");
  const again = await send(socketPath, "POST", "/v1/devices", body);
  assert.equal(again.status, 409);
  assert.equal(again.json().error?.errno, "EEXIST");
});

void test("invalid bodies are 400 EINVAL naming the field, and change nothing", async () => {
  const cases = [
    "{",
    JSON.stringify({ name: "d1" }),
    JSON.stringify({ name: "d1", backendPath: "/x", sizeBytes: -1 }),
    JSON.stringify({ name: "d1", backendPath: "/x", sizeBytes: 1.5 }),
    JSON.stringify({ name: "d1", backendPath: "/x", sizee: 4096 }),
    JSON.stringify([1, 2]),
  ];
  for (const body of cases) {
    const reply = await send(socketPath, "POST", "/v1/devices", body);
    assert.equal(reply.status, 400, body);
    assert.equal(reply.json().error?.errno, "EINVAL", body);
  }
  assert.equal(engine.devices.has("d1"), false);
  const unknownKey = await send(
    socketPath,
    "POST",
    "/v1/devices",
    JSON.stringify({ name: "d1", backendPath: "/x", sizee: 1 }),
  );
  assert.match(unknownKey.json().error?.message ?? "", /sizee/);
});

void test("unknown routes are 404, wrong methods 405 with Allow", async () => {
  const unknown = await send(socketPath, "GET", "/v1/nothing");
  assert.equal(unknown.status, 404);
  assert.equal(unknown.json().error?.errno, "ENOENT");
  const wrongMethod = await send(socketPath, "PUT", "/v1/devices");
  assert.equal(wrongMethod.status, 405);
  assert.equal(wrongMethod.headers.allow, "GET, POST");
});

void test("engine errors map to their HTTP status: ENOENT 404, ESRCH 404, EALREADY 409", async () => {
  const noDevice = await send(socketPath, "GET", "/v1/devices/nope/cbt");
  assert.equal(noDevice.status, 404);
  assert.deepEqual(noDevice.json().error, { errno: "ENOENT", message: "No device nope" });
  const noSnapshot = await send(socketPath, "POST", "/v1/snapshots/nope/take");
  assert.equal(noSnapshot.status, 404);
  assert.equal(noSnapshot.json().error?.errno, "ESRCH");
  const created = await send(
    socketPath,
    "POST",
    "/v1/snapshots",
    JSON.stringify({ storage: "memory:", limitBytes: 1 }),
  );
  assert.equal(created.status, 201);
  const id = String(created.json().id);
  assert.equal((await send(socketPath, "POST", `/v1/snapshots/${id}/take`)).status, 200);
  const second = await send(socketPath, "POST", `/v1/snapshots/${id}/take`);
  assert.equal(second.status, 409);
  assert.equal(second.json().error?.errno, "EALREADY");
});

void test("GET cbt/map answers raw bytes, or base64 JSON with the CBT info", async () => {
  await send(socketPath, "POST", "/v1/devices", JSON.stringify({ name: "cbt0", backendPath: "/d/c" }));
  const binary = await send(socketPath, "GET", "/v1/devices/cbt0/cbt/map");
  assert.equal(binary.status, 200);
  assert.equal(binary.headers["content-type"], "application/octet-stream");
  assert.deepEqual(new Uint8Array(binary.body), engine.map);
  const json = (await send(socketPath, "GET", "/v1/devices/cbt0/cbt/map?format=base64")).json();
  assert.deepEqual(new Uint8Array(Buffer.from(String(json.mapBase64), "base64")), engine.map);
  assert.equal(json.blockSizeBytes, 65536);
  const badFormat = await send(socketPath, "GET", "/v1/devices/cbt0/cbt/map?format=hex");
  assert.equal(badFormat.status, 400);
});

void test("POST mark-dirty passes the ranges to the engine; an empty or negative range is refused", async () => {
  await send(socketPath, "POST", "/v1/devices", JSON.stringify({ name: "md0", backendPath: "/d/md" }));
  const ranges = [{ offsetBytes: 0, lengthBytes: 4096 }];
  const reply = await send(socketPath, "POST", "/v1/devices/md0/cbt/mark-dirty", JSON.stringify({ ranges }));
  assert.equal(reply.status, 200);
  assert.deepEqual(engine.markedRanges, ranges);
  for (const bad of [[], [{ offsetBytes: 0, lengthBytes: 0 }], [{ offsetBytes: -1, lengthBytes: 1 }]]) {
    const refused = await send(
      socketPath,
      "POST",
      "/v1/devices/md0/cbt/mark-dirty",
      JSON.stringify({ ranges: bad }),
    );
    assert.equal(refused.status, 400);
  }
  assert.equal(engine.markedRanges.length, 1);
});

void test("snapshot routes take a unique id prefix; an ambiguous one is 400 EINVAL naming the candidates", async () => {
  const create = () =>
    send(socketPath, "POST", "/v1/snapshots", JSON.stringify({ storage: "memory:", limitBytes: 1 }));
  const ids = [String((await create()).json().id), String((await create()).json().id)];
  const ambiguous = await send(socketPath, "GET", "/v1/snapshots/snap");
  assert.equal(ambiguous.status, 400);
  assert.equal(ambiguous.json().error?.errno, "EINVAL");
  for (const id of ids) assert.match(String(ambiguous.json().error?.message), new RegExp(`\\b${id}\\b`));
  const exact = await send(socketPath, "GET", `/v1/snapshots/${ids[0]}`);
  assert.equal(exact.status, 200);
  assert.equal(exact.json().id, ids[0]);
  assert.equal((await send(socketPath, "GET", "/v1/snapshots/snax")).status, 404);
});

void test("a body over the limit is 413 EFBIG", async () => {
  const huge = Buffer.alloc(requestBodyBytesMax + 1, 0x20);
  const reply = await send(socketPath, "POST", "/v1/devices", huge);
  assert.equal(reply.status, 413);
  assert.equal(reply.json().error?.errno, "EFBIG");
});

void test("wait-event returns a queued event, null on timeout, and bounds timeoutMs", async () => {
  const created = (
    await send(socketPath, "POST", "/v1/snapshots", JSON.stringify({ storage: "memory:", limitBytes: 1 }))
  ).json();
  const id = String(created.id);
  engine.events.push({ type: "no_space", timeMs: 5, requestedBytes: 4096 });
  const event = { type: "no_space", timeMs: 5, requestedBytes: 4096, seq: 1 };
  const withEvent = await send(socketPath, "GET", `/v1/snapshots/${id}/event?timeoutMs=1000`);
  assert.deepEqual(withEvent.json(), { event, nextSince: 1, missed: 0 });
  const timedOut = await send(socketPath, "GET", `/v1/snapshots/${id}/event?timeoutMs=0`);
  assert.deepEqual(timedOut.json(), { event: null, nextSince: 1, missed: 0 });
  // A cursor reads the same event again, as often as asked.
  for (let attempt = 0; attempt < 2; attempt++) {
    const again = await send(socketPath, "GET", `/v1/snapshots/${id}/event?timeoutMs=0&since=0`);
    assert.deepEqual(again.json(), { event, nextSince: 1, missed: 0 });
  }
  const beyond = await send(socketPath, "GET", `/v1/snapshots/${id}/event?timeoutMs=0&since=2`);
  assert.equal(beyond.status, 400);
  assert.match(String(beyond.json().error?.message), /beyond the newest event/);
  for (const query of [
    "",
    "?timeoutMs=-1",
    "?timeoutMs=3600001",
    "?timeoutMs=abc",
    "?timeoutMs=1&x=2",
    "?timeoutMs=0&since=-1",
    "?timeoutMs=0&since=1.5",
  ]) {
    const refused = await send(socketPath, "GET", `/v1/snapshots/${id}/event${query}`);
    assert.equal(refused.status, 400, query);
  }
});

void test("DELETE routes answer what they removed; unknown names are 404", async () => {
  await send(socketPath, "POST", "/v1/devices", JSON.stringify({ name: "rm0", backendPath: "/d/rm" }));
  assert.deepEqual((await send(socketPath, "DELETE", "/v1/devices/rm0")).json(), { removed: "rm0" });
  assert.equal((await send(socketPath, "DELETE", "/v1/devices/rm0")).status, 404);
  const created = (
    await send(socketPath, "POST", "/v1/snapshots", JSON.stringify({ storage: "memory:", limitBytes: 1 }))
  ).json();
  assert.deepEqual((await send(socketPath, "DELETE", `/v1/snapshots/${created.id}`)).json(), {
    destroyed: created.id,
  });
  assert.equal((await send(socketPath, "DELETE", `/v1/snapshots/${created.id}`)).status, 404);
});

void test("a long poll in flight ends with 503 ESHUTDOWN when the daemon shuts down", async () => {
  const created = (
    await send(socketPath, "POST", "/v1/snapshots", JSON.stringify({ storage: "memory:", limitBytes: 1 }))
  ).json();
  const pending = send(socketPath, "GET", `/v1/snapshots/${created.id}/event?timeoutMs=3600000`);
  // The poll must have reached the server before the abort; status requests are answered in order.
  await send(socketPath, "GET", "/v1/status");
  shutdown.abort();
  const reply = await pending;
  assert.equal(reply.status, 503);
  assert.equal(reply.json().error?.errno, "ESHUTDOWN");
});

void test("listen() refuses a socket path on which a server still answers", async () => {
  await assert.rejects(
    ControlServer.listen({
      socketPath,
      logger: silentLogger,
      context: {
        engine,
        registry: new DeviceRegistry(join(directory, "other.json"), engine, silentLogger),
        identity: {
          pid: process.pid,
          version: "0",
          stateDir: directory,
          controlSocket: socketPath,
          access: { socketMode: "0600", socketGroup: null, whoCanConnect: [] },
        },
        addresses: { nbdSocketPath: null, nbdTcp: null, fuseMountDir: null },
        shutdownSignal: new AbortController().signal,
      },
    }),
    { errno: "EBUSY" },
  );
  assert.equal((await send(socketPath, "GET", "/v1/status")).status, 200);
});
