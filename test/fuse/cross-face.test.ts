// The FUSE and NBD faces over one Engine see the same bytes. Many writers at once, each on its own region:
// dd (O_DIRECT) through a loop device over the FUSE file, dd straight into the FUSE file, and qemu-io over
// NBD; meanwhile readers of a region nobody writes, through the loop device, the FUSE file and nbdcopy.
// Then every byte is read back through every path (loop, FUSE file, nbdcopy, qemu-img compare) and
// compared with the expected bytes. Done for an origin, then for a snapshot image while the origin is
// written through both faces underneath it (copy-before-write racing image writes and reads).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { EngineFixture, MiB } from "./engine-fixture.js";
import { must, type RunResult, run } from "./fuse-fixture.js";

const regionBytes = 4 * MiB;
const regionCount = 16;
const sizeBytes = regionBytes * regionCount;
/** Regions [12, 16) are never written in either phase: the parallel readers check them. */
const stableFirstRegion = 12;

/** One export as the three paths see it. */
interface Views {
  readonly label: string;
  readonly loop: string;
  readonly file: string;
  readonly uri: string;
}

type Path = "loop" | "file" | "nbd";

interface Write {
  readonly via: Path;
  readonly views: Views;
  readonly offsetBytes: number;
  readonly data: Buffer;
}

function ok(result: RunResult, what: string): void {
  assert.equal(result.exitCode, 0, `${what} failed (${result.exitCode}): ${result.stderr}${result.stdout}`);
}

async function writeVia(write: Write, directory: string, index: number): Promise<RunResult> {
  const source = join(directory, `${write.views.label}-write-${index}.bin`);
  await writeFile(source, write.data);
  if (write.via === "nbd") {
    return run("qemu-io", [
      "-f",
      "raw",
      write.views.uri,
      "-c",
      `write -q -s ${source} ${write.offsetBytes} ${write.data.byteLength}`,
    ]);
  }
  return run("dd", [
    `if=${source}`,
    `of=${write.via === "loop" ? write.views.loop : write.views.file}`,
    "bs=256k",
    `seek=${write.offsetBytes}`,
    "oflag=direct,seek_bytes",
    "conv=notrunc",
    "status=none",
  ]);
}

/** Three rounds of reading the stable regions through `via`, each compared with `stable`. */
function readStable(views: Views, via: Path, stable: string): Promise<RunResult> {
  const skipMiB = (stableFirstRegion * regionBytes) / MiB;
  const countMiB = ((regionCount - stableFirstRegion) * regionBytes) / MiB;
  const read =
    via === "nbd"
      ? `nbdcopy "$1" - | dd bs=1M skip=${skipMiB} count=${countMiB} iflag=fullblock status=none`
      : `dd if="$1" bs=1M skip=${skipMiB} count=${countMiB} iflag=direct status=none`;
  const source = via === "nbd" ? views.uri : via === "loop" ? views.loop : views.file;
  return run("sh", [
    "-c",
    `for round in 1 2 3; do ${read} | cmp - "$2" || exit 1; done`,
    `${views.label}-${via}-reader`,
    source,
    stable,
  ]);
}

/** Every byte through every path equals `expected`. */
async function assertEverywhere(views: Views, expected: Buffer, directory: string): Promise<void> {
  const expectedPath = join(directory, `${views.label}-expected.bin`);
  await writeFile(expectedPath, expected);
  const directRead = 'dd if="$1" bs=1M iflag=direct status=none | cmp - "$2"';
  const [viaLoop, viaFile, viaNbdcopy, viaQemuImg] = await Promise.all([
    run("sh", ["-c", directRead, "loop", views.loop, expectedPath]),
    run("sh", ["-c", directRead, "file", views.file, expectedPath]),
    run("sh", ["-c", 'nbdcopy "$1" - | cmp - "$2"', "nbd", views.uri, expectedPath]),
    run("qemu-img", ["compare", "-f", "raw", "-F", "raw", views.uri, expectedPath]),
  ]);
  ok(viaLoop, `${views.label}: the loop device against the expected bytes`);
  ok(viaFile, `${views.label}: the FUSE file against the expected bytes`);
  ok(viaNbdcopy, `${views.label}: nbdcopy against the expected bytes`);
  ok(viaQemuImg, `${views.label}: qemu-img compare against the expected bytes`);
}

/** Runs `writes` and readers of the stable regions of every `readViews` all at once; all must succeed. */
async function runConcurrently(
  writes: readonly Write[],
  readViews: readonly { views: Views; stable: Buffer }[],
  directory: string,
): Promise<void> {
  const readers: Promise<RunResult>[] = [];
  for (const { views, stable } of readViews) {
    const stablePath = join(directory, `${views.label}-stable.bin`);
    await writeFile(stablePath, stable);
    for (const via of ["loop", "file", "nbd"] as const) readers.push(readStable(views, via, stablePath));
  }
  const writers = writes.map((write, index) => writeVia(write, directory, index));
  const results = await Promise.all([...writers, ...readers]);
  results.forEach((result, index) => {
    const what =
      index < writes.length
        ? `writer ${index} (${writes[index]?.via} into ${writes[index]?.views.label})`
        : `stable-region reader ${index - writes.length}`;
    ok(result, what);
  });
}

/** Writes of random data to regions [first, first + 12): four through each path, one region each. */
function regionWrites(views: Views, regionBytesEach: number, inRegionOffsetBytes = 0): Write[] {
  const paths: Path[] = ["loop", "file", "nbd"];
  return Array.from({ length: stableFirstRegion }, (_, region) => ({
    via: paths[Math.floor(region / 4)] as Path,
    views,
    offsetBytes: region * regionBytes + inRegionOffsetBytes,
    data: randomBytes(regionBytesEach),
  }));
}

function apply(model: Buffer, writes: readonly Write[]): void {
  for (const write of writes) model.set(write.data, write.offsetBytes);
}

test("parallel writers and readers through FUSE (loop device and file) and NBD on one origin and on its snapshot image see the same bytes", async (t) => {
  const fixture = await EngineFixture.create(t, ["dd", "cmp", "sh", "qemu-io", "qemu-img", "nbdcopy"], {
    nbd: true,
  });
  if (!fixture) return;
  const { engine, directory } = fixture;
  await fixture.addDevice("disk0", sizeBytes);
  const initial = randomBytes(sizeBytes);
  const initialPath = join(directory, "initial.bin");
  await writeFile(initialPath, initial);
  await must("nbdcopy", ["--flush", initialPath, fixture.nbdUri("disk0")]);
  const origin: Views = {
    label: "origin",
    loop: await fixture.attachLoop("disk0"),
    file: fixture.filePath("disk0"),
    uri: fixture.nbdUri("disk0"),
  };

  // Phase 1: the origin alone.
  const originModel = Buffer.from(initial);
  const originWrites = regionWrites(origin, regionBytes);
  await runConcurrently(
    originWrites,
    [{ views: origin, stable: initial.subarray(stableFirstRegion * regionBytes) }],
    directory,
  );
  apply(originModel, originWrites);
  await assertEverywhere(origin, originModel, directory);

  // Phase 2: a snapshot image, written through all three paths while the origin is too.
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 2 * sizeBytes,
    devices: ["disk0"],
  });
  await engine.takeSnapshot(snapshot.id, { noFreeze: true });
  const imageName = `disk0@${snapshot.id}`;
  const image: Views = {
    label: "image",
    loop: await fixture.attachLoop(imageName),
    file: fixture.filePath(imageName),
    uri: fixture.nbdUri(imageName),
  };
  const imageModel = Buffer.from(originModel);
  // Image writes cover the first 3 MiB of each region, origin writes the 2 MiB from 2 MiB on: they share
  // chunks, so copy-before-write and image writes race for the same chunk locks.
  const imageWrites = regionWrites(image, 3 * MiB);
  const originLaterWrites = regionWrites(origin, 2 * MiB, 2 * MiB);
  await runConcurrently(
    [...imageWrites, ...originLaterWrites],
    [
      { views: image, stable: originModel.subarray(stableFirstRegion * regionBytes) },
      { views: origin, stable: originModel.subarray(stableFirstRegion * regionBytes) },
    ],
    directory,
  );
  apply(imageModel, imageWrites);
  apply(originModel, originLaterWrites);
  await assertEverywhere(image, imageModel, directory);
  await assertEverywhere(origin, originModel, directory);
  const info = engine.snapshotInfo(snapshot.id);
  assert.equal(info.state, "taken");
  assert.equal(info.devices[0]?.error, null, "the snapshot is intact");
});
