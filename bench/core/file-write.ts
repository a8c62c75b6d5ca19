/**
 * FileBackend write microbenchmark (not a test): 4 KiB random writes at queue depth 1 and 32 and 256 KiB
 * sequential writes at queue depth 16 through FileBackend (its file system writer thread), against the
 * same writes done with writeSync on the event loop (the floor: no thread hop). In-process, page cache hot.
 * The *shared* case writes from a SharedArrayBuffer-backed source, as the NBD face receives large WRITE
 * payloads: the writer thread writes it by reference instead of copying it into its staging buffer.
 * Usage: node dist/bench/core/file-write.js [FILE] [--seconds 2]
 */
import * as fs from "node:fs";
import { FileBackend } from "../../src/backends/file-backend.js";

const argv = process.argv.slice(2);
const givenFile = argv.find((argument) => !argument.startsWith("--") && argument !== secondsArgument());
const file = givenFile ?? "/tmp/blocksnap-file-write.img";
function secondsArgument(): string | undefined {
  const index = argv.indexOf("--seconds");
  return index >= 0 ? argv[index + 1] : undefined;
}
const seconds = Number(secondsArgument() ?? 2);
const fileBytes = 1 << 30;

interface Case {
  readonly name: string;
  readonly blockBytes: number;
  readonly queueDepth: number;
  readonly sequential: boolean;
  /** The source lives in a SharedArrayBuffer (written by reference). */
  readonly shared?: boolean;
}

const cases: readonly Case[] = [
  { name: "4 KiB random QD1", blockBytes: 4096, queueDepth: 1, sequential: false },
  { name: "4 KiB random QD32", blockBytes: 4096, queueDepth: 32, sequential: false },
  { name: "256 KiB sequential QD16", blockBytes: 256 * 1024, queueDepth: 16, sequential: true },
  {
    name: "256 KiB sequential QD16, shared source",
    blockBytes: 256 * 1024,
    queueDepth: 16,
    sequential: true,
    shared: true,
  },
];

function sourceOf(entry: Case): Uint8Array {
  const source = entry.shared
    ? new Uint8Array(new SharedArrayBuffer(entry.blockBytes))
    : new Uint8Array(entry.blockBytes);
  return source.fill(0x5a);
}

function offsets(entry: Case): () => number {
  const blocks = fileBytes / entry.blockBytes;
  let next = 0;
  return entry.sequential
    ? () => (next++ % blocks) * entry.blockBytes
    : () => Math.floor(Math.random() * blocks) * entry.blockBytes;
}

interface Rate {
  readonly opsPerSecond: number;
  /** CPU time (user + system, every thread of the process) per operation: less disturbed by other load. */
  readonly cpuUsPerOp: number;
}

function rate(done: number, startMs: number, cpuStart: NodeJS.CpuUsage): Rate {
  const cpu = process.cpuUsage(cpuStart);
  return {
    opsPerSecond: done / ((performance.now() - startMs) / 1000),
    cpuUsPerOp: (cpu.user + cpu.system) / done,
  };
}

async function throughBackend(backend: FileBackend, entry: Case): Promise<Rate> {
  const nextOffset = offsets(entry);
  const source = sourceOf(entry);
  const deadline = performance.now() + seconds * 1000;
  let done = 0;
  const loop = async () => {
    while (performance.now() < deadline) {
      await backend.write(nextOffset(), source);
      done++;
    }
  };
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  await Promise.all(Array.from({ length: entry.queueDepth }, loop));
  return rate(done, start, cpuStart);
}

function synchronous(fd: number, entry: Case): Rate {
  const nextOffset = offsets(entry);
  const source = sourceOf(entry);
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  const deadline = start + seconds * 1000;
  let done = 0;
  while (performance.now() < deadline) {
    fs.writeSync(fd, source, 0, source.byteLength, nextOffset());
    done++;
  }
  return rate(done, start, cpuStart);
}

const backend = FileBackend.open(file, { sizeBytes: fileBytes });
const fd = fs.openSync(file, "r+");
console.log(
  "### 6. File writes through the file system writer thread\n\n" +
    `${seconds} s per case, in-process, page cache hot; *writeSync* is the floor (the same writes on the event loop, no thread hop); CPU: user + system of every thread of the process per operation.\n`,
);
console.log(
  "| case | FileBackend ops/s | writeSync ops/s | ratio | FileBackend CPU µs/op | writeSync CPU µs/op |\n|---|---|---|---|---|---|",
);
for (const entry of cases) {
  const viaWriter = await throughBackend(backend, entry);
  const floor = synchronous(fd, entry);
  console.log(
    `| ${entry.name} | ${Math.round(viaWriter.opsPerSecond)} | ${Math.round(floor.opsPerSecond)} | ` +
      `${(viaWriter.opsPerSecond / floor.opsPerSecond).toFixed(2)}× | ${viaWriter.cpuUsPerOp.toFixed(1)} | ` +
      `${floor.cpuUsPerOp.toFixed(1)} |`,
  );
}
fs.closeSync(fd);
await backend.close();
if (givenFile === undefined) fs.rmSync(file);
