/**
 * Bad input to the Engine: every refused call is a BlockError with the expected errno and leaves no trace
 * (devices, snapshots, exports, CBT info and maps compare equal before and after; no file is created).
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError, type Errno } from "../block/errors.js";
import { Engine } from "./engine.js";
import { waitTimeoutMsMax } from "./engine-limits.js";
import type { SnapshotCreateOptions } from "./engine-types.js";

const KiB = 1024;
const MiB = 1024 * KiB;

const directory = mkdtempSync(join(tmpdir(), "blocksnap-engine-errors-"));
const fileBackendPath = join(directory, "disk2.img");
const fileBackendLink = join(directory, "disk2-link.img");
const engine = new Engine();
let createdId = ""; // holds disk0, not taken
let takenId = ""; // holds disk1, taken
let emptyId = ""; // no devices

before(async () => {
  await engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: 4 * MiB });
  await engine.addDevice({ name: "disk1", backendPath: "memory:", sizeBytes: 4 * MiB });
  await engine.addDevice({ name: "disk2", backendPath: fileBackendPath, sizeBytes: 2 * MiB });
  await engine.addDevice({ name: "free", backendPath: "memory:", sizeBytes: MiB });
  symlinkSync(fileBackendPath, fileBackendLink);
  const storage = { storage: "memory:", limitBytes: 16 * MiB, growthPortionBytes: MiB };
  createdId = (await engine.createSnapshot({ ...storage, devices: ["disk0"] })).id;
  takenId = (await engine.createSnapshot({ ...storage, devices: ["disk1"] })).id;
  emptyId = (await engine.createSnapshot({ ...storage })).id;
  await engine.takeSnapshot(takenId);
  // Some CBT history, so that a wrongly applied mark would show in the read map.
  await engine.findExport("disk1")!.device.write(0, new Uint8Array(4096).fill(1));
});

after(async () => {
  await engine.close();
  rmSync(directory, { recursive: true, force: true });
});

/** Everything an erroneous call could have changed. */
function engineState(): unknown {
  return {
    devices: engine.listDevices(),
    snapshots: engine.listSnapshots(),
    exports: engine.listExports().map((entry) => entry.name),
    cbt: engine.listDevices().map((device) => {
      const cbt = engine.tracker(device.name).cbt;
      return {
        info: engine.cbtInfo(device.name),
        readMap: cbt.isCorrupted ? "corrupted" : engine.cbtRead(device.name),
        writeMap: cbt.writeMapCopy(),
        active: cbt.activeNumber,
      };
    }),
    files: existsSync(fileBackendPath) ? statSync(fileBackendPath).size : null,
  };
}

/** Runs `call`, which must fail with `errno`, and checks that the engine is as it was. */
async function refused(errno: Errno, call: () => unknown, label = ""): Promise<void> {
  const stateBefore = engineState();
  let outcome: unknown;
  try {
    await call();
    outcome = "resolved";
  } catch (error) {
    outcome = error;
  }
  assert.ok(outcome instanceof BlockError, `${label}: expected ${errno}, got ${String(outcome)}`);
  assert.equal(outcome.errno, errno, `${label}: ${outcome.message}`);
  assert.deepEqual(engineState(), stateBefore, `${label}: state changed`);
}

test("device names outside [A-Za-z0-9._-]{1,64} are refused with EINVAL", async () => {
  const names: unknown[] = ["", "a".repeat(65), "a/b", "/", "..", ".", "disk@0", "x y", "é", "a\n", 42, null];
  for (const name of names) {
    await refused(
      "EINVAL",
      () => engine.addDevice({ name: name as string, backendPath: "memory:", sizeBytes: MiB }),
      JSON.stringify(name),
    );
  }
  // The boundary itself is fine: 64 characters of every allowed kind.
  const longest = `Az09._-${"x".repeat(57)}`;
  assert.equal(longest.length, 64);
  await engine.addDevice({ name: longest, backendPath: "memory:", sizeBytes: MiB });
  await engine.removeDevice(longest);
});

test("a device name that exists is refused with EEXIST", async () => {
  await refused("EEXIST", () => engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: MiB }));
});

test("device sizes below 4 KiB or not an integer are refused with EINVAL and create no file", async () => {
  for (const sizeBytes of [
    0,
    1,
    1000,
    4095,
    -1,
    -MiB,
    1.5,
    MiB + 0.5,
    Number.NaN,
    Number.POSITIVE_INFINITY,
    2 ** 60,
  ]) {
    await refused(
      "EINVAL",
      () => engine.addDevice({ name: "new", backendPath: "memory:", sizeBytes }),
      `memory ${sizeBytes}`,
    );
    const path = join(directory, "never-created.img");
    await refused(
      "EINVAL",
      () => engine.addDevice({ name: "new", backendPath: path, sizeBytes }),
      `file ${sizeBytes}`,
    );
    assert.equal(existsSync(path), false);
  }
  await refused("EINVAL", () => engine.addDevice({ name: "new", backendPath: "memory:" }), "memory, no size");
});

test("bad backends are refused: empty path, a directory, an absent file without size, an empty file", async () => {
  await refused("EINVAL", () => engine.addDevice({ name: "new", backendPath: "", sizeBytes: MiB }));
  await refused("EINVAL", () => engine.addDevice({ name: "new", backendPath: directory }));
  await refused("ENOENT", () =>
    engine.addDevice({ name: "new", backendPath: join(directory, "absent.img") }),
  );
  const emptyPath = join(directory, "empty.img");
  writeFileSync(emptyPath, new Uint8Array(0));
  await refused("EINVAL", () => engine.addDevice({ name: "new", backendPath: emptyPath }));
});

test("CBT block sizes that are not a power of two from 4 KiB to 64 MiB are refused with EINVAL", async () => {
  for (const cbtBlockSizeBytes of [0, -65536, 2 * KiB, 3000, 3 * 65536, 128 * MiB, 65536.5, Number.NaN]) {
    await refused(
      "EINVAL",
      () => engine.addDevice({ name: "new", backendPath: "memory:", sizeBytes: MiB, cbtBlockSizeBytes }),
      `${cbtBlockSizeBytes}`,
    );
  }
  const added = await engine.addDevice({
    name: "small-blocks",
    backendPath: "memory:",
    sizeBytes: MiB,
    cbtBlockSizeBytes: 4 * KiB,
  });
  assert.equal(added.cbt.blockSizeBytes, 4 * KiB);
  assert.equal(added.cbt.blockCount, 256);
  await engine.removeDevice("small-blocks");
});

test("snapshot options out of range are refused with EINVAL", async () => {
  const good: SnapshotCreateOptions = { storage: "memory:", limitBytes: 16 * MiB, devices: ["free"] };
  const bad: Array<[string, Partial<SnapshotCreateOptions>]> = [
    ["chunk 3000", { chunkSizeBytes: 3000 }],
    ["chunk 2 KiB", { chunkSizeBytes: 2 * KiB }],
    ["chunk 128 MiB", { chunkSizeBytes: 128 * MiB }],
    ["chunk 12 KiB", { chunkSizeBytes: 12 * KiB }],
    ["chunk 0", { chunkSizeBytes: 0 }],
    ["chunk NaN", { chunkSizeBytes: Number.NaN }],
    ["limit 0", { limitBytes: 0 }],
    ["limit -1", { limitBytes: -1 }],
    ["limit 1.5", { limitBytes: 1.5 }],
    ["limit NaN", { limitBytes: Number.NaN }],
    ["limit Infinity", { limitBytes: Number.POSITIVE_INFINITY }],
    ["limit 2 bytes", { limitBytes: 2 }],
    ["limit below the chunk", { limitBytes: 64 * KiB, chunkSizeBytes: 128 * KiB }],
    ["limit below a chunk per device", { limitBytes: 256 * KiB, devices: ["free", "other"] }],
    ["growth below one chunk", { chunkSizeBytes: 256 * KiB, growthPortionBytes: 128 * KiB }],
    ["growth 0", { growthPortionBytes: 0 }],
    ["growth NaN", { growthPortionBytes: Number.NaN }],
    ["policy", { onCowError: "ignore" as SnapshotCreateOptions["onCowError"] }],
    ["storage empty", { storage: "" }],
    ["storage /dev/null", { storage: "/dev/null" }],
    ["device twice", { devices: ["free", "free"] }],
  ];
  for (const [label, change] of bad) {
    await refused("EINVAL", () => engine.createSnapshot({ ...good, ...change }), label);
  }
});

test("snapshots naming unknown or busy devices are refused (ENOENT, EBUSY)", async () => {
  const storage = { storage: "memory:", limitBytes: 16 * MiB };
  await refused("ENOENT", () => engine.createSnapshot({ ...storage, devices: ["free", "nope"] }));
  await refused("EBUSY", () => engine.createSnapshot({ ...storage, devices: ["free", "disk0"] }));
  await refused("EBUSY", () => engine.createSnapshot({ ...storage, devices: ["disk1"] }));
});

test("storage on the backend file of a device is refused with EINVAL, also through a symlink", async () => {
  for (const storagePath of [fileBackendPath, fileBackendLink]) {
    // As a member's storage, and as the storage of snapshots disk2 is not in: its writes and the
    // storage's regions would overwrite each other all the same.
    await refused(
      "EINVAL",
      () => engine.createSnapshot({ storage: storagePath, limitBytes: 16 * MiB, devices: ["disk2"] }),
      storagePath,
    );
    await refused("EINVAL", () => engine.createSnapshot({ storage: storagePath, limitBytes: 16 * MiB }));
    await refused("EINVAL", () => engine.appendStorage(createdId, { storage: storagePath }), storagePath);
    await refused("EINVAL", () => engine.appendStorage(emptyId, { storage: storagePath }), storagePath);
  }
});

test("a device on the file that holds a snapshot's storage is refused with EINVAL", async () => {
  const storagePath = join(directory, "storage-of-a-snapshot.diff");
  const holder = await engine.createSnapshot({ storage: storagePath, limitBytes: 16 * MiB });
  const storageSizeBytes = statSync(storagePath).size;
  await refused("EINVAL", () => engine.addDevice({ name: "on-storage", backendPath: storagePath }));
  const link = join(directory, "storage-link.diff");
  symlinkSync(storagePath, link);
  await refused("EINVAL", () => engine.addDevice({ name: "on-storage", backendPath: link, sizeBytes: MiB }));
  assert.equal(statSync(storagePath).size, storageSizeBytes);
  await engine.destroySnapshot(holder.id);
  // Once the snapshot is gone the file is an ordinary file again.
  await engine.addDevice({ name: "on-storage", backendPath: storagePath });
  await engine.removeDevice("on-storage");
});

test("unknown devices are ENOENT and unknown snapshot ids ESRCH, for every call", async () => {
  const unknownId = "00000000-0000-4000-8000-000000000000";
  for (const id of [unknownId, "", "../etc", "not-a-uuid"]) {
    await refused("ESRCH", () => engine.snapshotInfo(id), `info ${id}`);
    await refused("ESRCH", () => engine.takeSnapshot(id), `take ${id}`);
    await refused("ESRCH", () => engine.destroySnapshot(id), `destroy ${id}`);
    await refused("ESRCH", () => engine.addDeviceToSnapshot(id, "free"), `add ${id}`);
    await refused("ESRCH", () => engine.appendStorage(id, { storage: "memory:" }), `append ${id}`);
    await refused("ESRCH", () => engine.waitEvent(id, 0), `wait ${id}`);
  }
  for (const name of ["nope", "", "disk0@x", "../disk0"]) {
    await refused("ENOENT", () => engine.removeDevice(name), `remove ${name}`);
    await refused("ENOENT", () => engine.deviceInfo(name), `info ${name}`);
    await refused("ENOENT", () => engine.cbtInfo(name), `cbt info ${name}`);
    await refused("ENOENT", () => engine.cbtRead(name), `cbt read ${name}`);
    await refused("ENOENT", () => engine.cbtMarkDirty(name, [{ offsetBytes: 0, lengthBytes: 1 }]), name);
    await refused("ENOENT", () => engine.addDeviceToSnapshot(createdId, name), `add ${name}`);
  }
});

test("adding devices: EALREADY twice, EBUSY from another snapshot, EPERM after take", async () => {
  await refused("EALREADY", () => engine.addDeviceToSnapshot(createdId, "disk0"));
  await refused("EBUSY", () => engine.addDeviceToSnapshot(createdId, "disk1"));
  await refused("EBUSY", () => engine.addDeviceToSnapshot(takenId, "disk0"));
  await refused("EPERM", () => engine.addDeviceToSnapshot(takenId, "free"));
  await refused("EALREADY", () => engine.addDeviceToSnapshot(takenId, "disk1"));
});

test("take: EALREADY for a taken snapshot, ENODEV for one without devices", async () => {
  await refused("EALREADY", () => engine.takeSnapshot(takenId));
  await refused("ENODEV", () => engine.takeSnapshot(emptyId));
  // The refused take left the snapshot usable: a device can still join it.
  assert.equal(engine.snapshotInfo(emptyId).state, "created");
});

test("removing a device that is in a snapshot is EBUSY", async () => {
  await refused("EBUSY", () => engine.removeDevice("disk0"));
  await refused("EBUSY", () => engine.removeDevice("disk1"));
});

test("mark-dirty ranges outside the device are EINVAL and mark nothing, even the valid ones", async () => {
  const sizeBytes = engine.deviceInfo("disk1").sizeBytes;
  const badRanges = [
    { offsetBytes: sizeBytes - 4096, lengthBytes: 4097 },
    { offsetBytes: sizeBytes, lengthBytes: 1 },
    { offsetBytes: -1, lengthBytes: 10 },
    { offsetBytes: 0, lengthBytes: 0 },
    { offsetBytes: 0, lengthBytes: -5 },
    { offsetBytes: 0.5, lengthBytes: 10 },
    { offsetBytes: 0, lengthBytes: Number.NaN },
    { offsetBytes: 2 ** 60, lengthBytes: 1 },
  ];
  for (const bad of badRanges) {
    await refused(
      "EINVAL",
      () => engine.cbtMarkDirty("disk1", [{ offsetBytes: MiB, lengthBytes: 4096 }, bad]),
      JSON.stringify(bad),
    );
  }
  // Control: the valid range alone is marked in both maps.
  const readBefore = engine.cbtRead("disk1");
  await engine.cbtMarkDirty("disk1", [{ offsetBytes: MiB, lengthBytes: 4096 }]);
  const blockIndex = MiB / engine.cbtInfo("disk1").blockSizeBytes;
  assert.notDeepEqual(engine.cbtRead("disk1"), readBefore);
  assert.equal(engine.cbtRead("disk1")[blockIndex], engine.cbtInfo("disk1").changesNumber);
});

test("waitEvent timeouts outside 0 .. 24 h are EINVAL", async () => {
  for (const timeoutMs of [-1, 1.5, Number.NaN, waitTimeoutMsMax + 1, Number.POSITIVE_INFINITY]) {
    await refused("EINVAL", () => engine.waitEvent(takenId, timeoutMs), `${timeoutMs}`);
  }
  assert.equal(await engine.waitEvent(takenId, 0), null);
});

test("appendStorage sizes that are not positive integers are EINVAL", async () => {
  const storageDirectory = join(directory, "append-dir");
  mkdirSync(storageDirectory);
  for (const sizeBytes of [0, -1, 1.5, Number.NaN]) {
    await refused(
      "EINVAL",
      () => engine.appendStorage(takenId, { storage: "memory:", sizeBytes }),
      `${sizeBytes}`,
    );
    await refused(
      "EINVAL",
      () => engine.appendStorage(takenId, { storage: join(directory, "append.diff"), sizeBytes }),
      `file ${sizeBytes}`,
    );
    await refused("EINVAL", () => engine.appendStorage(takenId, { storage: storageDirectory, sizeBytes }));
  }
  assert.equal(existsSync(join(directory, "append.diff")), false);
  await refused("EINVAL", () => engine.appendStorage(takenId, { storage: "/dev/null" }));
});
