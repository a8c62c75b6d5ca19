// Benchmark (not a test): built-in backup into a local directory repository (issue 13, "Speed"), in one run:
//  - a full backup (`backup create --level full`, through the daemon: snapshot, in-process read, SHA-256,
//    zstd, chunk files) of an image half random, half compressible text, page cache hot;
//  - an incremental after 1 % of the image was rewritten over NBD (in 1 MiB runs at random offsets);
//  - a restore of the latest backup to a new file (`backup restore --to`, parallel chunk reads);
//  - the same full backup and restore into an encrypted repository (AES-256-GCM, keyed chunk names);
//  - origin write latency: fio 4 KiB random writes at QD1 against the device's NBD export, alone and
//    during a full backup (into a fresh repository, so the backup writes every chunk): p50/p99, IOPS;
//  - the references on the same image: `qemu-img convert -c -O qcow2` and `nbdcopy` to a sparse file, both
//    reading the device's NBD export, as an external backup tool would.
// Rates are image bytes per wall-clock second of the CLI command (process start included). Also the
// compression ratio (plain bytes of the stored chunks / bytes stored) and the dedup ratio (image bytes of
// both backups / plain bytes of distinct chunks stored). The image is generated fast (random chunks from the
// CSPRNG, text-like chunks from 8 templates made unique by a stamp per 4 KiB). Usage (after tsc):
//   node dist/bench/backup/local-bench.js [--size-mib 1024] [--out bench/results/backup-local.md]
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes, randomFillSync } from "node:crypto";
import { mkdir, mkdtemp, open, rm, stat, writeFile } from "node:fs/promises";
import { loadavg, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { zstdLevel } from "../../src/backup/chunk-codec.js";
import { machineFactsMarkdown, markdownTable, progress } from "../core/bench-util.js";

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "1024" },
    out: { type: "string", default: "bench/results/backup-local.md" },
  },
});
const sizeMib = Number(values["size-mib"]);
if (!Number.isInteger(sizeMib) || sizeMib < 64 || sizeMib % 8 !== 0)
  throw new Error("--size-mib: a multiple of 8, at least 64");
const MiB = 1 << 20;
const chunkBytes = 4 * MiB;
const sizeBytes = sizeMib * MiB;
const cliPath = join(resolve(dirname(fileURLToPath(import.meta.url)), "../../.."), "dist/src/cli/main.js");

function run(file: string, args: readonly string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

async function timed(label: string, work: () => Promise<unknown>): Promise<number> {
  const started = performance.now();
  await work();
  const ms = performance.now() - started;
  progress(`${label}: ${(ms / 1000).toFixed(2)} s`);
  return ms;
}

/** Text-like bytes: 256-byte slices at random offsets of a 1 MiB word soup (zstd finds the repeats). */
function compressibleChunk(soup: Buffer): Buffer {
  const chunk = Buffer.alloc(chunkBytes);
  for (let offset = 0; offset < chunkBytes; offset += 256) {
    const from = Math.floor(Math.random() * (soup.length - 256));
    soup.copy(chunk, offset, from, from + 256);
  }
  return chunk;
}

/** A text-like chunk of its own: a template with the chunk's index stamped into every 4 KiB block. */
function stampedChunk(template: Buffer, chunkIndex: number, target: Buffer): Buffer {
  template.copy(target);
  for (let offset = 0; offset < chunkBytes; offset += 4096) {
    target.writeUInt32LE(chunkIndex, offset);
    target.writeUInt32LE(offset, offset + 4);
  }
  return target;
}

function wordSoup(): Buffer {
  const words = Array.from({ length: 2048 }, () =>
    randomBytes(3 + Math.floor(Math.random() * 6)).toString("base64url"),
  );
  const text: string[] = [];
  let length = 0;
  while (length < MiB) {
    const word = words[Math.floor(Math.random() * words.length)] ?? "x";
    text.push(word);
    length += word.length + 1;
  }
  return Buffer.from(text.join(" ")).subarray(0, MiB);
}

interface FioResult {
  readonly p50Us: number;
  readonly p99Us: number;
  readonly iops: number;
}

/** fio 4 KiB random writes at QD1 on the NBD export; ends after `runtimeS` or at stop() (SIGINT). */
function startFio(uri: string, runtimeS: number): { child: ChildProcess; result: Promise<FioResult> } {
  const child = spawn(
    "fio",
    [
      "--name=origin-writes",
      "--ioengine=nbd",
      `--uri=${uri}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=1",
      "--time_based",
      `--runtime=${runtimeS}`,
      // An eighth of the device: the backup's own snapshot may hold a quarter of it in copies (its default
      // limit), so fio's first touches cannot overflow it.
      `--size=${sizeMib / 8}M`,
      "--output-format=json",
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (data: Buffer) => {
    stdout += data.toString();
  });
  child.stderr?.on("data", (data: Buffer) => {
    stderr += data.toString();
  });
  const result = new Promise<FioResult>((resolvePromise, reject) => {
    child.once("exit", () => {
      try {
        const json = JSON.parse(stdout.slice(stdout.indexOf("{")));
        const write = json.jobs[0].write;
        resolvePromise({
          p50Us: write.clat_ns.percentile["50.000000"] / 1000,
          p99Us: write.clat_ns.percentile["99.000000"] / 1000,
          iops: write.iops,
        });
      } catch (error) {
        reject(new Error(`fio gave no result: ${stderr} ${String(error)}`));
      }
    });
  });
  return { child, result };
}

const mibPerSecond = (bytes: number, ms: number) => bytes / MiB / (ms / 1000);
const cli = (args: readonly string[]) => run(process.execPath, [cliPath, ...args, "--state-dir", stateDir]);

const directory = await mkdtemp(join(tmpdir(), "blocksnap-bench-backup-"));
const stateDir = join(directory, "state");
const loadBefore = loadavg();
const daemon = spawn(process.execPath, [cliPath, "serve", "--state-dir", stateDir, "--fuse-mount", "none"], {
  stdio: "ignore",
});
let markdown = "";
try {
  for (let attempt = 0; attempt < 200; attempt++) {
    try {
      await cli(["status"]);
      break;
    } catch {
      await new Promise((wake) => setTimeout(wake, 100));
    }
  }
  const backend = join(directory, "b0.img");
  const soup = wordSoup();
  const templates = Array.from({ length: 8 }, () => compressibleChunk(soup));
  const file = await open(backend, "w");
  const textChunk = Buffer.alloc(chunkBytes);
  const randomChunk = Buffer.alloc(chunkBytes);
  for (let index = 0; index < sizeBytes / chunkBytes; index++) {
    const data =
      index % 2 === 0
        ? randomFillSync(randomChunk)
        : stampedChunk(templates[(index >> 1) % templates.length] as Buffer, index, textChunk);
    await file.write(data, 0, data.length, index * chunkBytes);
  }
  await file.close();
  await cli(["device", "add", "b0", "--backend", backend]);
  const uri = `nbd+unix:///b0?socket=${join(stateDir, "nbd.sock")}`;
  const repository = join(directory, "repo");
  await cli(["backup", "init", "--repo", repository]);
  const lastLine = (stdout: string) => JSON.parse(stdout.trim().split("\n").pop() ?? "{}");

  let full: { result: { newChunks: number; newBytesStored: number } } | null = null;
  const fullMs = await timed("full backup", async () => {
    full = lastLine(
      await cli(["backup", "create", "--device", "b0", "--repo", repository, "--level", "full", "--json"]),
    );
  });
  // 1 % of the image rewritten in 1 MiB runs at random 1 MiB-aligned offsets, through the device (CBT).
  const runs = Math.max(1, Math.round(sizeMib / 100));
  const writes = Array.from({ length: runs }, (_unused, index) => [
    "-c",
    `write -P ${(index % 250) + 1} ${Math.floor(Math.random() * sizeMib) * MiB} 1M`,
  ]).flat();
  await run("qemu-io", ["-f", "raw", uri, ...writes]);
  let inc: { result: { readBytes: number; newChunks: number; newBytesStored: number } } | null = null;
  const incMs = await timed("incremental backup", async () => {
    inc = lastLine(
      await cli(["backup", "create", "--device", "b0", "--repo", repository, "--level", "inc", "--json"]),
    );
  });
  const restored = join(directory, "restored.img");
  const restoreMs = await timed("restore", () =>
    cli(["backup", "restore", "b0/latest", "--repo", repository, "--to", restored]),
  );
  await rm(restored, { force: true });

  // Encrypted: a repository of its own, the same image (CBT writes above are in it: it is still 1 image).
  const keyFile = join(directory, "bench.key");
  await cli(["backup", "key", "create", keyFile]);
  const encryptedRepository = join(directory, "repo-encrypted");
  await cli(["backup", "init", "--repo", encryptedRepository, "--key", keyFile]);
  const encryptedFullMs = await timed("encrypted full backup", () =>
    cli([
      "backup",
      "create",
      "--device",
      "b0",
      "--repo",
      encryptedRepository,
      "--key",
      keyFile,
      "--level",
      "full",
    ]),
  );
  const encryptedRestoreMs = await timed("encrypted restore", () =>
    cli([
      "backup",
      "restore",
      "b0/latest",
      "--repo",
      encryptedRepository,
      "--key",
      keyFile,
      "--to",
      restored,
    ]),
  );
  await rm(restored, { force: true });
  await rm(encryptedRepository, { recursive: true, force: true });

  // Origin write latency: fio alone, then during a full backup into a fresh repository.
  const fioAlone = await startFio(uri, 10).result;
  progress(
    `fio alone: p50 ${fioAlone.p50Us.toFixed(0)} µs, p99 ${fioAlone.p99Us.toFixed(0)} µs, ${fioAlone.iops.toFixed(0)} IOPS`,
  );
  const loadedRepository = join(directory, "repo-under-writes");
  await cli(["backup", "init", "--repo", loadedRepository]);
  const fioDuring = startFio(uri, 3600);
  // fio connects and starts writing before the backup begins.
  await new Promise((wake) => setTimeout(wake, 1000));
  const loadedFullMs = await timed("full backup during fio", () =>
    cli(["backup", "create", "--device", "b0", "--repo", loadedRepository, "--level", "full"]),
  );
  fioDuring.child.kill("SIGINT");
  const fioLoaded = await fioDuring.result;
  progress(
    `fio during: p50 ${fioLoaded.p50Us.toFixed(0)} µs, p99 ${fioLoaded.p99Us.toFixed(0)} µs, ${fioLoaded.iops.toFixed(0)} IOPS`,
  );
  await rm(loadedRepository, { recursive: true, force: true });
  const qcow2 = join(directory, "ref.qcow2");
  const qemuMs = await timed("qemu-img convert -c", () =>
    run("qemu-img", ["convert", "-c", "-O", "qcow2", uri, qcow2]),
  );
  const qcow2Bytes = (await stat(qcow2)).size;
  await rm(qcow2, { force: true });
  const sparse = join(directory, "ref.raw");
  const nbdcopyMs = await timed("nbdcopy", () => run("nbdcopy", [uri, sparse]));
  await rm(sparse, { force: true });
  const loadAfter = loadavg();

  const fullResult = (full as { result: { newChunks: number; newBytesStored: number } } | null)?.result;
  const incResult = (
    inc as { result: { readBytes: number; newChunks: number; newBytesStored: number } } | null
  )?.result;
  if (fullResult === undefined || incResult === undefined) throw new Error("a backup gave no result");
  const storedPlain = (fullResult.newChunks + incResult.newChunks) * chunkBytes;
  const storedBytes = fullResult.newBytesStored + incResult.newBytesStored;
  const fullRate = mibPerSecond(sizeBytes, fullMs);
  const rows = [
    ["full backup (`backup create --level full`)", (fullMs / 1000).toFixed(2), fullRate.toFixed(0), "1.00×"],
    [
      `incremental after 1 % changed (${runs} × 1 MiB; read ${(incResult.readBytes / MiB).toFixed(0)} MiB)`,
      (incMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, incMs).toFixed(0),
      `time ${((incMs / fullMs) * 100).toFixed(1)} % of the full`,
    ],
    [
      "restore to a new file (`backup restore --to`)",
      (restoreMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, restoreMs).toFixed(0),
      "–",
    ],
    [
      "encrypted full backup (AES-256-GCM, `--key`)",
      (encryptedFullMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, encryptedFullMs).toFixed(0),
      `${((fullMs / encryptedFullMs) * 100).toFixed(0)} % of the plain full's rate`,
    ],
    [
      "encrypted restore to a new file",
      (encryptedRestoreMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, encryptedRestoreMs).toFixed(0),
      "–",
    ],
    [
      "full backup while fio writes to the origin (fresh repository)",
      (loadedFullMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, loadedFullMs).toFixed(0),
      `${((fullMs / loadedFullMs) * 100).toFixed(0)} % of the quiet full's rate`,
    ],
    [
      "`qemu-img convert -c -O qcow2` from the NBD export",
      (qemuMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, qemuMs).toFixed(0),
      `full backup ${(fullRate / mibPerSecond(sizeBytes, qemuMs)).toFixed(2)}× its rate`,
    ],
    [
      "`nbdcopy` from the NBD export to a sparse file",
      (nbdcopyMs / 1000).toFixed(2),
      mibPerSecond(sizeBytes, nbdcopyMs).toFixed(0),
      `full backup ${(fullRate / mibPerSecond(sizeBytes, nbdcopyMs)).toFixed(2)}× its rate`,
    ],
  ];
  markdown = [
    "## Local backup repository (`node dist/bench/backup/local-bench.js`)",
    "",
    machineFactsMarkdown(),
    "",
    `${sizeMib} MiB image, 4 MiB chunks alternating random and text-like (compressible) data, page cache hot; a directory repository on the same disk (no encryption unless said), zstd level ${zstdLevel}. Wall times of the CLI commands (process start included). Load average (1 / 5 / 15 min) before: ${loadBefore.map((value) => value.toFixed(1)).join(" / ")}, after: ${loadAfter.map((value) => value.toFixed(1)).join(" / ")}.`,
    "",
    markdownTable(["step", "seconds", "MiB/s of image", "ratio"], rows),
    "",
    `Origin write latency (fio, 4 KiB random writes, QD1, over the first eighth of the device's NBD export; every first write to a snapshot chunk during the backup is a copy-before-write): alone p50 ${fioAlone.p50Us.toFixed(0)} µs, p99 ${fioAlone.p99Us.toFixed(0)} µs, ${fioAlone.iops.toFixed(0)} IOPS; during the full backup p50 ${fioLoaded.p50Us.toFixed(0)} µs, p99 ${fioLoaded.p99Us.toFixed(0)} µs, ${fioLoaded.iops.toFixed(0)} IOPS.`,
    "",
    `Compression: ${(storedPlain / storedBytes).toFixed(2)}× (${(storedPlain / MiB).toFixed(0)} MiB of new chunks stored in ${(storedBytes / MiB).toFixed(0)} MiB; qcow2 -c: ${(sizeBytes / qcow2Bytes).toFixed(2)}× of the image). Dedup: ${((2 * sizeBytes) / storedPlain).toFixed(2)}× (two logically full backups, ${((2 * sizeBytes) / MiB).toFixed(0)} MiB, hold ${(storedPlain / MiB).toFixed(0)} MiB of distinct chunks). Incremental: ${incResult.newChunks} new chunk(s).`,
    "",
  ].join("\n");
} finally {
  daemon.kill("SIGTERM");
  await new Promise((wake) => daemon.once("exit", wake));
  await rm(directory, { recursive: true, force: true });
}
await mkdir(dirname(values.out), { recursive: true });
await writeFile(values.out, markdown);
process.stdout.write(markdown);
