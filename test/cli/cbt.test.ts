/**
 * CBT through the real binary, checked against a model of blksnap's maps (docs/design/semantics.md): over
 * several takes, the map read while a snapshot is held does not change with later origin writes;
 * changes_number rises by one per take; blocks written in round k carry k+1 in the next map; mark-dirty
 * raises the blocks it covers now and in the next map; a clean restart keeps the generation and the maps,
 * a kill -9 starts a new generation that says why.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { CbtInfoView } from "../../src/daemon/api-types.js";
import { which } from "../helpers/commands.js";
import { DaemonProcess, runCommand } from "./cli-harness.js";

const blockSizeBytes = 64 * 1024;
const blockCount = 64;
const roundsCount = 4;
let directory = "";
let stateDir = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-cbt-"));
  stateDir = join(directory, "state");
  daemon = await DaemonProcess.start(stateDir);
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

async function readMap(name: string, round: number, suffix: string): Promise<Uint8Array> {
  const out = join(directory, `map-${round}-${suffix}`);
  await daemon.cliOk(["cbt", "read", name, "--out", out]);
  return new Uint8Array(await readFile(out));
}

async function writeBlocks(name: string, blockIndexes: readonly number[]): Promise<void> {
  const uri = `nbd+unix:///${name}?socket=${daemon.nbdSocket}`;
  const commands = blockIndexes.flatMap((blockIndex) => [
    "-c",
    `write -P ${blockIndex + 1} ${blockIndex * blockSizeBytes + 512} 4096`,
  ]);
  const result = await runCommand("qemu-io", ["-f", "raw", uri, ...commands]);
  assert.equal(result.code, 0, result.stdout + result.stderr);
}

void test("CBT maps across takes, mark-dirty, and a restart", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  await daemon.cliOk([
    "device",
    "add",
    "c0",
    "--backend",
    join(directory, "c0.img"),
    "--size",
    "4M",
    "--cbt-block-size",
    "64K",
  ]);
  const initial = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
  assert.deepEqual(
    { ...initial, generationId: "", generationStartedAt: "" },
    {
      blockSizeBytes,
      deviceSizeBytes: blockCount * blockSizeBytes,
      blockCount,
      generationId: "",
      changesNumber: 0,
      generationReason: "attached",
      generationStartedAt: "",
    },
  );
  const human = await daemon.cliOk(["cbt", "info", "c0"]);
  assert.match(human, /^block size:\s+65536$/m);
  assert.match(human, new RegExp(`^generation id:\\s+${initial.generationId}$`, "m"));

  // The model: blksnap's read map after take k holds, per block, the round of its last write + 1, where
  // round r is the time between take r and take r+1 (round 0: before the first take).
  const readModel = new Uint8Array(blockCount);
  const writeModel = new Uint8Array(blockCount);
  await writeBlocks("c0", [0, 63]);
  writeModel[0] = writeModel[63] = 1;

  for (let take = 1; take <= roundsCount; take++) {
    const id = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "16M", "--device", "c0"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", id]);
    readModel.set(writeModel);

    const info = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
    assert.equal(info.changesNumber, take);
    assert.equal(info.generationId, initial.generationId);
    const held = await readMap("c0", take, "held");
    assert.deepEqual(held, readModel, `map after take ${take}`);

    // Round `take`: writes set the live map to take + 1, never the map just read.
    const written = [take, take + 10, take + 20, (take * 7) % blockCount];
    await writeBlocks("c0", written);
    for (const blockIndex of written) writeModel[blockIndex] = take + 1;
    if (take === 2) {
      // Blocks 40..42 (partly covered ranges mark whole blocks): now `take`, in the next map `take + 1`.
      await daemon.cliOk([
        "cbt",
        "mark-dirty",
        "c0",
        "--range",
        `${40 * 64}K:64K`,
        "--range",
        `${41 * 64 + 1}K:${64 + 62}K`,
      ]);
      for (const blockIndex of [40, 41, 42]) {
        readModel[blockIndex] = Math.max(readModel[blockIndex]!, take);
        writeModel[blockIndex] = take + 1;
      }
    }
    assert.deepEqual(await readMap("c0", take, "after-writes"), readModel, `map during round ${take}`);
    await daemon.cliOk(["snapshot", "destroy", id]);
  }

  // A clean restart keeps the generation, the changes number and the exact maps.
  await writeBlocks("c0", [7, 8]);
  const beforeRestart = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
  const readMapBefore = await readMap("c0", roundsCount, "before-restart");
  assert.equal((await daemon.stop()).code, 0);
  daemon = await DaemonProcess.start(stateDir);
  const restarted = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
  assert.deepEqual(restarted, { ...beforeRestart, generationReason: "restored" });
  assert.equal(restarted.generationId, initial.generationId);
  assert.deepEqual(await readMap("c0", roundsCount, "after-restart"), readMapBefore);
  // The writes made before the restart are in the next take's map.
  const id = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "c0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
  const next = await readMap("c0", roundsCount + 1, "after-restart-take");
  assert.equal(next[7], beforeRestart.changesNumber + 1);
  assert.equal(next[8], beforeRestart.changesNumber + 1);
  await daemon.cliOk(["snapshot", "destroy", id]);

  // A kill -9 keeps the generation (the write-intent journal): the writes made since the last take are
  // reported by the recovered maps, in the read map (what `cbt read` returns) and in the next take.
  const beforeCrash = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
  await writeBlocks("c0", [3, 9]);
  assert.equal((await daemon.stop("SIGKILL")).signal, "SIGKILL");
  daemon = await DaemonProcess.start(stateDir);
  const afterCrash = await daemon.cliJson<CbtInfoView>(["cbt", "info", "c0"]);
  assert.equal(afterCrash.generationId, initial.generationId, "a crash keeps the generation");
  assert.ok(afterCrash.changesNumber > beforeCrash.changesNumber, "the recovery counts as a change epoch");
  const recovered = await readMap("c0", roundsCount + 2, "after-crash");
  for (const blockIndex of [3, 9]) {
    assert.ok(
      recovered[blockIndex]! > beforeCrash.changesNumber,
      `block ${blockIndex} written before the crash is reported after it (${recovered[blockIndex]})`,
    );
  }
  const crashId = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "c0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", crashId, "--no-freeze"]);
  const afterCrashTake = await readMap("c0", roundsCount + 3, "after-crash-take");
  for (const blockIndex of [3, 9]) assert.ok(afterCrashTake[blockIndex]! > beforeCrash.changesNumber);
  await daemon.cliOk(["snapshot", "destroy", crashId]);
});

void test("cbt read --out -: the raw map on stdout; with --json one JSON document that carries it", async () => {
  await daemon.cliOk(["device", "add", "c1", "--backend", join(directory, "c1.img"), "--size", "1M"]);
  await daemon.cliOk(["cbt", "mark-dirty", "c1", "--range", "0:4K"]);
  const id = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "c1"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
  const file = await readMap("c1", 0, "file");
  const raw = await daemon.cli(["cbt", "read", "c1", "--out", "-"]);
  assert.equal(raw.code, 0, raw.stderr);
  assert.deepEqual(new Uint8Array(Buffer.from(raw.stdout, "utf8")), file);

  const result = await daemon.cli(["cbt", "read", "c1", "--out", "-", "--json"]);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stderr, "");
  const view = JSON.parse(result.stdout) as CbtInfoView & {
    mapBase64: string;
    out: string;
    bytesWritten: number;
  };
  assert.equal(view.out, "-");
  assert.equal(view.bytesWritten, file.byteLength);
  assert.equal(view.blockCount, file.byteLength);
  assert.deepEqual(new Uint8Array(Buffer.from(view.mapBase64, "base64")), file);
  assert.ok(
    file.some((value) => value !== 0),
    "mark-dirty shows in the map",
  );
});
