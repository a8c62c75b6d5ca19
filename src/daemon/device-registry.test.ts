import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError } from "../block/errors.js";
import type { DeviceAddOptions, DeviceInfo } from "../engine/engine-types.js";
import { silentLogger } from "../util/logger.js";
import type { ControlEngine } from "./control-engine.js";
import { DeviceRegistry } from "./device-registry.js";

/** Only what the registry calls; backends listed in `missing` fail to open like an absent file. */
function fakeEngine(missing: ReadonlySet<string> = new Set()): ControlEngine & { added: DeviceAddOptions[] } {
  const devices = new Map<string, DeviceAddOptions>();
  const added: DeviceAddOptions[] = [];
  const unused = (): never => {
    throw new Error("not used by the registry");
  };
  return {
    added,
    async addDevice(options) {
      if (missing.has(options.backendPath))
        throw new BlockError("ENOENT", `no such file ${options.backendPath}`);
      if (devices.has(options.name)) throw new BlockError("EEXIST", `${options.name} exists`);
      devices.set(options.name, options);
      // The write intent is the CBT keeper's (tested in test/durable); what matters here is the rest.
      const { writeIntent: _writeIntent, ...rest } = options;
      added.push(rest);
      return { name: options.name, sizeBytes: options.sizeBytes ?? 8192 } as DeviceInfo;
    },
    async removeDevice(name) {
      if (!devices.delete(name)) throw new BlockError("ENOENT", `no device ${name}`);
    },
    listDevices: unused,
    deviceInfo: unused,
    cbtInfo: unused,
    cbtRead: unused,
    cbtState: unused,
    cbtMarkDirty: unused,
    createSnapshot: unused,
    addDeviceToSnapshot: unused,
    appendStorage: unused,
    takeSnapshot: unused,
    snapshotInfo: unused,
    listSnapshots: unused,
    readEvent: unused,
    destroySnapshot: unused,
  };
}

let directory = "";
before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-registry-"));
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

void test("DeviceRegistry persists adds and removes, and restore() re-adds them without a size", async () => {
  const path = join(directory, "a.json");
  const first = new DeviceRegistry(path, fakeEngine(), silentLogger);
  await first.restore();
  await first.add({ name: "d0", backendPath: "/x/d0", sizeBytes: 4096, cbtBlockSizeBytes: 65536 });
  await first.add({ name: "m0", backendPath: "memory:", sizeBytes: 1 << 20 });
  await first.add({ name: "d1", backendPath: "/x/d1" });
  await first.remove("d1");
  const saved = JSON.parse(await readFile(path, "utf8"));
  assert.deepEqual(saved, {
    version: 1,
    devices: [
      { name: "d0", backendPath: "/x/d0", cbtBlockSizeBytes: 65536 },
      { name: "m0", backendPath: "memory:", sizeBytes: 1 << 20 },
    ],
  });
  const engine = fakeEngine();
  await new DeviceRegistry(path, engine, silentLogger).restore();
  assert.deepEqual(engine.added, [
    {
      ...saved.devices[0],
      cbtGenerationReason: "untrusted: saved CBT state: ENOENT: no such file or directory, stat '/x/d0'",
    },
    { ...saved.devices[1], cbtGenerationReason: "untrusted: memory: devices come back empty" },
  ]);
});

void test("a failed add leaves the file unchanged", async () => {
  const path = join(directory, "b.json");
  const registry = new DeviceRegistry(path, fakeEngine(new Set(["/gone"])), silentLogger);
  await registry.add({ name: "d0", backendPath: "/x/d0" });
  const before = await readFile(path, "utf8");
  await assert.rejects(registry.add({ name: "d0", backendPath: "/x/other" }), { errno: "EEXIST" });
  await assert.rejects(registry.add({ name: "d1", backendPath: "/gone" }), { errno: "ENOENT" });
  assert.equal(await readFile(path, "utf8"), before);
});

void test("a remove whose registry save fails attaches the device again and leaves the file unchanged", async () => {
  const path = join(directory, "e.json");
  const engine = fakeEngine();
  const registry = new DeviceRegistry(path, engine, silentLogger);
  await registry.add({ name: "d0", backendPath: "/x/d0" });
  await registry.add({ name: "d1", backendPath: "/x/d1" });
  const before = await readFile(path, "utf8");
  // A directory where the temporary file would go makes the atomic write fail.
  await mkdir(`${path}.tmp-${process.pid}`);
  await assert.rejects(registry.remove("d0"), /d0 not removed: cannot save/);
  assert.equal(await readFile(path, "utf8"), before);
  assert.deepEqual(
    engine.added.map((options) => options.name),
    ["d0", "d1", "d0"],
    "d0 was attached again",
  );
  await rm(`${path}.tmp-${process.pid}`, { recursive: true });
  await registry.remove("d0");
  assert.doesNotMatch(await readFile(path, "utf8"), /"d0"/);
});

void test("a device in use is not removed unless forced", async () => {
  const path = join(directory, "f.json");
  const registry = new DeviceRegistry(path, fakeEngine(), silentLogger, {
    deviceUsers: async (name) => (name === "busy" ? ["/dev/loop7 mounted at /mnt (ext4)"] : []),
  });
  await registry.add({ name: "busy", backendPath: "/x/busy" });
  await assert.rejects(registry.remove("busy"), {
    errno: "EBUSY",
    message: /loop7 mounted at \/mnt.*--force/,
  });
  assert.match(await readFile(path, "utf8"), /"busy"/);
  await registry.remove("busy", { force: true });
  assert.doesNotMatch(await readFile(path, "utf8"), /"busy"/);
});

void test("a device whose backend is gone at restore stays registered as unavailable until removed", async () => {
  const path = join(directory, "c.json");
  await new DeviceRegistry(path, fakeEngine(), silentLogger).add({ name: "late", backendPath: "/late" });
  const registry = new DeviceRegistry(path, fakeEngine(new Set(["/late"])), silentLogger);
  await registry.restore();
  assert.deepEqual(
    registry.unavailable().map((device) => [device.name, device.error.errno]),
    [["late", "ENOENT"]],
  );
  assert.match(await readFile(path, "utf8"), /late/);
  await registry.remove("late");
  assert.deepEqual(registry.unavailable(), []);
  assert.doesNotMatch(await readFile(path, "utf8"), /late/);
});

void test("restore() refuses a malformed registry file instead of overwriting it", async () => {
  const cases = [
    "{",
    JSON.stringify({ version: 2, devices: [] }),
    JSON.stringify({ version: 1, devices: [{ name: "" }] }),
  ];
  for (const content of cases) {
    const path = join(directory, "d.json");
    await writeFile(path, content);
    await assert.rejects(new DeviceRegistry(path, fakeEngine(), silentLogger).restore(), { errno: "EINVAL" });
    assert.equal(await readFile(path, "utf8"), content);
  }
});
