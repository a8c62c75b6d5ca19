/**
 * Snapshot-image read throughput (issue #2, measurement 5).
 *
 * A FileBackend device (a file in a temp dir, prefilled) with a taken snapshot whose storage is a
 * directory there. The first half of the device is left untouched (image reads come from the origin,
 * under the chunk lock); every chunk of the second half is preserved by one 4 KiB origin write (image
 * reads come from the difference storage). Sequential 1 MiB reads, queue depth 1, through the image
 * export (CheckedDevice over SnapshotImage), compared with the same reads of the origin export. Everything
 * is in the page cache after the first pass; median of the passes.
 */

import type { BlockDevice } from "../../src/block/device.js";
import { Engine } from "../../src/engine/engine.js";
import {
  fixed,
  KiB,
  MiB,
  markdownTable,
  median,
  mibPerSecond,
  patternBytes,
  printSection,
  progress,
  scratchDir,
  timeMs,
} from "./bench-util.js";

const deviceSizeBytes = 256 * MiB;
const halfBytes = deviceSizeBytes / 2;
const readSizeBytes = MiB;
const passCount = 7;
const chunkSizesBytes = [64 * KiB, 256 * KiB];

interface ReadResult {
  readonly chunkSizeBytes: number;
  readonly originMs: number;
  readonly splitMs: number;
  readonly untouchedMs: number;
  readonly preservedMs: number;
}

async function readRange(device: BlockDevice, fromBytes: number, toBytes: number): Promise<void> {
  const target = new Uint8Array(readSizeBytes);
  for (let offsetBytes = fromBytes; offsetBytes < toBytes; offsetBytes += readSizeBytes) {
    await device.read(offsetBytes, target);
  }
}

/** The same 1 MiB reads split into chunk-sized preads straight on the backend: the floor of the split. */
async function readRangeSplit(
  device: BlockDevice,
  fromBytes: number,
  toBytes: number,
  pieceBytes: number,
): Promise<void> {
  const target = new Uint8Array(readSizeBytes);
  for (let offsetBytes = fromBytes; offsetBytes < toBytes; offsetBytes += readSizeBytes) {
    for (let inReadBytes = 0; inReadBytes < readSizeBytes; inReadBytes += pieceBytes) {
      await device.read(offsetBytes + inReadBytes, target.subarray(inReadBytes, inReadBytes + pieceBytes));
    }
  }
}

async function measure(chunkSizeBytes: number): Promise<ReadResult> {
  const scratch = scratchDir("image-read");
  const engine = new Engine();
  try {
    await engine.addDevice({
      name: "disk0",
      backendPath: `${scratch.path}/origin.img`,
      sizeBytes: deviceSizeBytes,
    });
    const origin = engine.findExport("disk0")!.device;
    const fill = patternBytes(MiB, 9);
    for (let offsetBytes = 0; offsetBytes < deviceSizeBytes; offsetBytes += MiB)
      await origin.write(offsetBytes, fill);
    const snapshot = await engine.createSnapshot({
      storage: scratch.path,
      limitBytes: deviceSizeBytes,
      devices: ["disk0"],
      chunkSizeBytes,
    });
    await engine.takeSnapshot(snapshot.id);
    const source = patternBytes(4 * KiB, 13);
    for (let offsetBytes = halfBytes; offsetBytes < deviceSizeBytes; offsetBytes += chunkSizeBytes) {
      await origin.write(offsetBytes, source);
    }
    const image = engine.findExport(`disk0@${snapshot.id}`)!.device;
    const check = new Uint8Array(MiB);
    await image.read(halfBytes, check);
    if (!check.every((byte, i) => byte === fill[i])) throw new Error("image does not show the data at take");

    const originMs: number[] = [];
    const splitMs: number[] = [];
    const backend = engine.tracker("disk0").backend;
    const untouchedMs: number[] = [];
    const preservedMs: number[] = [];
    for (let pass = 0; pass < passCount; pass++) {
      originMs.push(await timeMs(() => readRange(origin, 0, halfBytes)));
      splitMs.push(await timeMs(() => readRangeSplit(backend, 0, halfBytes, chunkSizeBytes)));
      untouchedMs.push(await timeMs(() => readRange(image, 0, halfBytes)));
      preservedMs.push(await timeMs(() => readRange(image, halfBytes, deviceSizeBytes)));
    }
    await engine.destroySnapshot(snapshot.id);
    return {
      chunkSizeBytes,
      originMs: median(originMs),
      splitMs: median(splitMs),
      untouchedMs: median(untouchedMs),
      preservedMs: median(preservedMs),
    };
  } finally {
    await engine.close();
    scratch.remove();
  }
}

function render(results: readonly ReadResult[]): string {
  const readCount = halfBytes / readSizeBytes;
  const rows = results.map((result) => [
    `${result.chunkSizeBytes / KiB} KiB`,
    fixed(mibPerSecond(halfBytes, result.originMs), 0),
    fixed(mibPerSecond(halfBytes, result.splitMs), 0),
    fixed(mibPerSecond(halfBytes, result.untouchedMs), 0),
    fixed(mibPerSecond(halfBytes, result.preservedMs), 0),
    fixed((result.originMs * 1000) / readCount, 0),
    fixed((result.splitMs * 1000) / readCount, 0),
    fixed((result.untouchedMs * 1000) / readCount, 0),
    fixed((result.preservedMs * 1000) / readCount, 0),
  ]);
  return [
    "### 5. Snapshot-image read throughput (FileBackend, file storage)",
    "",
    `Sequential ${readSizeBytes / MiB} MiB reads at queue depth 1 over ${halfBytes / MiB} MiB, page cache ` +
      `hot, median of ${passCount} passes. *origin*: the origin export (baseline); *image, untouched*: ` +
      "image reads of chunks still on the origin; *image, preserved*: image reads of chunks in the " +
      "difference storage; *split floor*: the same reads cut into chunk-sized preads straight on the " +
      "backend (the image splits every request at chunk borders).",
    "",
    markdownTable(
      [
        "chunk",
        "origin MiB/s",
        "split floor MiB/s",
        "image untouched MiB/s",
        "image preserved MiB/s",
        "origin µs/read",
        "split floor µs/read",
        "image untouched µs/read",
        "image preserved µs/read",
      ],
      rows,
    ),
  ].join("\n");
}

const results: ReadResult[] = [];
for (const chunkSizeBytes of chunkSizesBytes) {
  progress(`image-read: ${chunkSizeBytes / KiB} KiB chunks`);
  results.push(await measure(chunkSizeBytes));
}
printSection(render(results));
