/**
 * First-touch cost (issue 16: copy-before-write slowdown), in process, as CPU per first touch so that load
 * on a shared machine disturbs it little, and its physical floor.
 *
 * One file device (256 MiB, filled) and a directory storage in a temp dir, as cow-bench's server has. A
 * pass writes 4 KiB once into every 64 KiB chunk, in a shuffled chunk order, at queue depth 16 through the
 * origin export (CheckedDevice over the Tracker). *first touch* passes run right after a take, so every
 * write preserves its chunk (destroy follows); *no snapshot* passes run the same writes with no snapshot.
 * Passes alternate in ABBA order; the extra cost of a first touch is the paired difference, in process CPU
 * (user + system, every thread: pool and writer threads too) and in wall time per write; the event-loop
 * thread's share comes from /proc/self/task (Linux).
 *
 * The floor does the same I/O with no server logic, on the event loop with synchronous calls: per write one
 * 4 KiB pwrite to the origin file, and for a first touch before it one 64 KiB pread of the chunk and one
 * 64 KiB pwrite of it to a new region of a fresh storage file (sized by ftruncate, like the storage's
 * growth) — the least any server must do per copy-before-write on this machine.
 * Usage: node --expose-gc dist/bench/core/cow-first-touch.js [--pairs 6] [--size-mib 256]
 */
import * as fs from "node:fs";
import { parseArgs } from "node:util";
import type { BlockDevice } from "../../src/block/device.js";
import { Engine } from "../../src/engine/engine.js";
import {
  collectGarbageIfExposed,
  fixed,
  KiB,
  MiB,
  markdownTable,
  median,
  patternBytes,
  printSection,
  progress,
  quantile,
  scratchDir,
  seededRandom,
  statCpuTicks,
} from "./bench-util.js";

const { values } = parseArgs({
  options: {
    pairs: { type: "string", default: "6" },
    "size-mib": { type: "string", default: "256" },
  },
});
const pairCount = Number(values.pairs);
const deviceSizeBytes = Number(values["size-mib"]) * MiB;
const writeSizeBytes = 4 * KiB;
const chunkSizeBytes = 64 * KiB;
const queueDepth = 16;
const chunkCount = deviceSizeBytes / chunkSizeBytes;

interface PassResult {
  readonly cpuUs: number;
  /** CPU of the event-loop thread alone (the rest is the writer thread, the pool, GC and JIT threads). */
  readonly loopCpuUs: number;
  readonly wallUs: number;
}

/** CPU time of this process's main thread, from /proc (clock ticks of 10 ms: long passes only). */
function loopCpuNowUs(): number {
  return statCpuTicks(`/proc/self/task/${process.pid}/stat`) * 10_000;
}

function cpuNowUs(): number {
  const usage = process.cpuUsage();
  return usage.user + usage.system;
}

async function measured(operation: () => Promise<void> | void): Promise<PassResult> {
  collectGarbageIfExposed();
  const cpuBeforeUs = cpuNowUs();
  const loopCpuBeforeUs = loopCpuNowUs();
  const wallBefore = process.hrtime.bigint();
  await operation();
  return {
    cpuUs: cpuNowUs() - cpuBeforeUs,
    loopCpuUs: loopCpuNowUs() - loopCpuBeforeUs,
    wallUs: Number(process.hrtime.bigint() - wallBefore) / 1000,
  };
}

/** One write per chunk, in `offsets` order, at queue depth 16. */
function writeAll(device: BlockDevice, offsets: Float64Array, source: Uint8Array): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (next < offsets.length) {
      const offsetBytes = offsets[next++] as number;
      await device.write(offsetBytes, source);
    }
  };
  return Promise.all(Array.from({ length: queueDepth }, lane)).then(() => {});
}

/** The floor: the same I/O as synchronous system calls, no server logic. */
function floorPass(originFd: number, storageDirectory: string, offsets: Float64Array, withCopy: boolean) {
  const source = patternBytes(writeSizeBytes, 11);
  const chunk = Buffer.allocUnsafeSlow(chunkSizeBytes);
  const storagePath = `${storageDirectory}/floor-storage`;
  const storageFd = fs.openSync(storagePath, "w+");
  fs.unlinkSync(storagePath);
  try {
    fs.ftruncateSync(storageFd, chunkSizeBytes * (chunkCount + 1));
    return measured(() => {
      for (let index = 0; index < offsets.length; index++) {
        const offsetBytes = offsets[index] as number;
        if (withCopy) {
          const chunkStartBytes = Math.floor(offsetBytes / chunkSizeBytes) * chunkSizeBytes;
          fs.readSync(originFd, chunk, 0, chunkSizeBytes, chunkStartBytes);
          fs.writeSync(storageFd, chunk, 0, chunkSizeBytes, (index + 1) * chunkSizeBytes);
        }
        fs.writeSync(originFd, source, 0, writeSizeBytes, offsetBytes);
      }
    });
  } finally {
    fs.closeSync(storageFd);
  }
}

function spread(values: readonly number[], digits: number): string[] {
  return [
    fixed(median(values), digits),
    `${fixed(quantile(values, 0.25), digits)} … ${fixed(quantile(values, 0.75), digits)}`,
  ];
}

async function main(): Promise<void> {
  const scratch = scratchDir("first-touch");
  const engine = new Engine();
  try {
    const originPath = `${scratch.path}/disk0.img`;
    await engine.addDevice({ name: "disk0", backendPath: originPath, sizeBytes: deviceSizeBytes });
    const device = engine.findExport("disk0")?.device;
    if (!device) throw new Error("no origin export");
    const fill = patternBytes(MiB, 7);
    for (let offsetBytes = 0; offsetBytes < deviceSizeBytes; offsetBytes += MiB)
      await device.write(offsetBytes, fill);
    await device.flush();

    // Every chunk once, shuffled, at a random 4 KiB block inside it.
    const random = seededRandom(16);
    const order = Array.from({ length: chunkCount }, (_, index) => index);
    for (let index = order.length - 1; index > 0; index--) {
      const other = Math.floor(random() * (index + 1));
      [order[index], order[other]] = [order[other] as number, order[index] as number];
    }
    const offsets = new Float64Array(
      order.map(
        (chunkIndex) =>
          chunkIndex * chunkSizeBytes +
          Math.floor(random() * (chunkSizeBytes / writeSizeBytes)) * writeSizeBytes,
      ),
    );
    const source = patternBytes(writeSizeBytes, 11);

    const plainPass = () => measured(() => writeAll(device, offsets, source));
    const firstTouchPass = async () => {
      const snapshot = await engine.createSnapshot({
        storage: scratch.path,
        limitBytes: 2 * deviceSizeBytes,
        devices: ["disk0"],
        chunkSizeBytes,
      });
      await engine.takeSnapshot(snapshot.id);
      const result = await measured(() => writeAll(device, offsets, source));
      const stored = engine.snapshotInfo(snapshot.id).devices[0]?.chunksStored;
      await engine.destroySnapshot(snapshot.id);
      if (stored !== chunkCount) throw new Error(`expected ${chunkCount} chunks stored, got ${stored}`);
      return result;
    };

    await firstTouchPass();
    await plainPass();
    const extraCpuUs: number[] = [];
    const extraLoopCpuUs: number[] = [];
    const extraWallUs: number[] = [];
    const plainCpuUs: number[] = [];
    const firstCpuUs: number[] = [];
    const ratio: number[] = [];
    for (let pair = 0; pair < pairCount; pair++) {
      await device.flush();
      const results: PassResult[] = [];
      for (const kind of pair % 2 === 0 ? ["first", "plain"] : ["plain", "first"]) {
        const result = kind === "first" ? await firstTouchPass() : await plainPass();
        results[kind === "first" ? 0 : 1] = result;
      }
      const [first, plain] = results as [PassResult, PassResult];
      extraCpuUs.push((first.cpuUs - plain.cpuUs) / chunkCount);
      extraLoopCpuUs.push((first.loopCpuUs - plain.loopCpuUs) / chunkCount);
      extraWallUs.push((first.wallUs - plain.wallUs) / chunkCount);
      plainCpuUs.push(plain.cpuUs / chunkCount);
      firstCpuUs.push(first.cpuUs / chunkCount);
      ratio.push(first.wallUs / plain.wallUs);
      progress(`cow-first-touch: pair ${pair + 1} of ${pairCount}`);
    }

    await device.flush();
    const originFd = fs.openSync(originPath, "r+");
    const floorExtraCpuUs: number[] = [];
    const floorExtraWallUs: number[] = [];
    const floorPlainWallUs: number[] = [];
    try {
      for (let round = 0; round < pairCount; round++) {
        const withCopy = await floorPass(originFd, scratch.path, offsets, true);
        const without = await floorPass(originFd, scratch.path, offsets, false);
        floorExtraCpuUs.push((withCopy.cpuUs - without.cpuUs) / chunkCount);
        floorExtraWallUs.push((withCopy.wallUs - without.wallUs) / chunkCount);
        floorPlainWallUs.push(without.wallUs / chunkCount);
      }
    } finally {
      fs.closeSync(originFd);
    }

    printSection(
      [
        "### First touch: extra cost of a copy-before-write, in process (file device, directory storage)",
        "",
        `${chunkCount} 4 KiB writes per pass, one into every ${chunkSizeBytes / KiB} KiB chunk of a ` +
          `${deviceSizeBytes / MiB} MiB file device, shuffled, QD${queueDepth}, through the origin export; ` +
          `${pairCount} ABBA pairs of a pass right after a take (every write preserves its chunk) and a pass ` +
          "with no snapshot. CPU = process.cpuUsage() (every thread). *floor*: the same I/O as synchronous " +
          "system calls with no server logic (64 KiB pread + 64 KiB pwrite to a new storage region per " +
          "first touch, 4 KiB pwrite per write).",
        "",
        markdownTable(
          ["measure", "median", "quartiles"],
          [
            ["CPU µs per write, no snapshot", ...spread(plainCpuUs, 1)],
            ["CPU µs per write, first touch", ...spread(firstCpuUs, 1)],
            ["extra CPU µs per first touch", ...spread(extraCpuUs, 1)],
            ["… of which on the event-loop thread", ...spread(extraLoopCpuUs, 1)],
            ["extra wall µs per first touch", ...spread(extraWallUs, 1)],
            ["wall time ratio first touch / no snapshot", ...spread(ratio, 2)],
            ["floor: extra CPU µs per first touch", ...spread(floorExtraCpuUs, 1)],
            ["floor: extra wall µs per first touch", ...spread(floorExtraWallUs, 1)],
            ["floor: wall µs per 4 KiB pwrite", ...spread(floorPlainWallUs, 1)],
          ],
        ),
      ].join("\n"),
    );
  } finally {
    await engine.close();
    scratch.remove();
  }
}

await main();
