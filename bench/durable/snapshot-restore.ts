/**
 * Restart cost of a kept snapshot (durable-state issue, item 3): how long a start spends bringing back a
 * taken snapshot of 16 devices of 1 TiB holding 1 M stored chunks, measured on the two steps that grow
 * with the chunk count: decoding the chunk log (1 M records, 32 MiB) and rebuilding the chunk maps
 * (DiffArea.restoreStored). Devices are sparse memory backends; the storage is a memory area large enough
 * for the recorded locations (no data is read at restore). Median of 5 runs.
 */
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { DiffArea } from "../../src/cow/diff-area.js";
import { ChunkLogWriter, decodeChunkLog } from "../../src/persist/chunk-log.js";
import type { PersistFile } from "../../src/persist/persist-file.js";
import { DiffStorage } from "../../src/storage/diff-storage.js";

const TiB = 2 ** 40;
const devices = 16;
const chunks = 1 << 20;
const chunkSizeBytes = 64 * 1024;
const runs = 5;

class MemoryFile implements PersistFile {
  private readonly parts: Uint8Array[] = [];
  private lengthBytes = 0;
  async write(positionBytes: number, data: Uint8Array): Promise<void> {
    if (positionBytes !== this.lengthBytes) throw new Error("the bench appends in order");
    this.parts.push(data);
    this.lengthBytes += data.byteLength;
  }
  async sync(): Promise<void> {}
  async readAll(): Promise<Uint8Array> {
    return Buffer.concat(this.parts);
  }
  async close(): Promise<void> {}
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? 0;
}

const file = new MemoryFile();
const writer = await ChunkLogWriter.open(file, 0, "bench");
const perDevice = chunks / devices;
for (let device = 0; device < devices; device++) {
  for (let index = 0; index < perDevice; index++) {
    // Chunks spread over the device; locations one after the other in the storage.
    await writer.stored(device, index * 255, 4096 + (device * perDevice + index) * chunkSizeBytes);
  }
}
const bytes = await file.readAll();
const decodeMs: number[] = [];
const rebuildMs: number[] = [];
for (let run = 0; run < runs; run++) {
  const decodeStart = performance.now();
  const log = decodeChunkLog(bytes);
  decodeMs.push(performance.now() - decodeStart);
  const storage = new DiffStorage({ path: "memory:", limitBytes: 2 ** 40, growthPortionBytes: 2 ** 37 });
  const rebuildStart = performance.now();
  for (let device = 0; device < devices; device++) {
    const area = new DiffArea({
      deviceName: `d${device}`,
      origin: new MemoryBackend(TiB),
      sizeBytes: TiB,
      chunkSizeBytes,
      storage,
      onCowError: "break-snapshot",
      onCorrupted: () => {},
    });
    area.restoreStored(log.chunks.get(device) ?? new Map());
  }
  rebuildMs.push(performance.now() - rebuildStart);
  await storage.close();
}
const total = median(decodeMs) + median(rebuildMs);
console.log(
  [
    "# Kept snapshot restore",
    "",
    `${devices} devices of 1 TiB, ${chunks} chunk records (${(bytes.byteLength / 2 ** 20).toFixed(0)} MiB of log), 64 KiB chunks; median of ${runs} runs.`,
    "",
    "| step | ms |",
    "| --- | --- |",
    `| decode the chunk log | ${median(decodeMs).toFixed(0)} |`,
    `| rebuild the chunk maps | ${median(rebuildMs).toFixed(0)} |`,
    `| total (goal < 2000) | ${total.toFixed(0)} |`,
  ].join("\n"),
);
