// Benchmark (not a test): backup and restore throughput into an S3 repository on a local OpenStack Swift
// (s3api; started here with test/backup/swift-server.ts), against a plain @aws-sdk/client-s3 PUT / GET loop
// of the same bytes in 4 MiB objects with the same number of requests in flight (8), in one run. Also the
// S3 requests per GiB backed up and restored, counted from Swift's proxy access log. The device holds
// random (incompressible) bytes, so both sides move the same number of bytes; its file is page-cache hot.
// `backup run` goes through the daemon (snapshot, read, SHA-256, zstd attempt, PUT), `backup restore`
// through the CLI (GET, MD5 ETag and content checks, positioned writes). Usage (after tsc):
//   node dist/bench/backup/s3-bench.js [--size-mib 512] [--rounds 2] [--out bench/results/s3.md]
import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { GetObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { S3Store } from "../../src/backup/s3-store.js";
import { SwiftServer } from "../../test/backup/swift-server.js";
import { machineFactsMarkdown, markdownTable, progress } from "../core/bench-util.js";

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "512" },
    rounds: { type: "string", default: "2" },
    out: { type: "string", default: "bench/results/s3.md" },
  },
});
const sizeMib = Number(values["size-mib"]);
const rounds = Number(values.rounds);
const objectBytes = 4 << 20;
const inFlight = 8;
const bucket = "bench";
const cliPath = join(resolve(dirname(fileURLToPath(import.meta.url)), "../../.."), "dist/src/cli/main.js");

function run(file: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { env, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

async function bounded(count: number, work: (index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (next < count) {
      const index = next;
      next += 1;
      await work(index);
    }
  };
  await Promise.all(Array.from({ length: Math.min(inFlight, count) }, lane));
}

/** S3 requests seen by Swift's proxy since `fromLine` (S3-style lines only, not Swift subrequests). */
async function requestsSince(
  swift: SwiftServer,
  fromLine: number,
): Promise<{ lines: number; count: number }> {
  const lines = (await readFile(join(swift.directory, "proxy.log"), "utf8")).split("\n");
  const count = lines
    .slice(fromLine)
    .filter((line) => /\s(GET|PUT|HEAD|DELETE|POST) \/(?!v1\/|healthcheck)/.test(line)).length;
  return { lines: lines.length, count };
}

const mibPerSecond = (bytes: number, ms: number) => bytes / (1 << 20) / (ms / 1000);

const swift = await SwiftServer.start();
progress(`Swift healthy in ${swift.startMs.toFixed(0)} ms`);
const directory = await mkdtemp(join(tmpdir(), "blocksnap-bench-s3-"));
const env = {
  ...process.env,
  AWS_ACCESS_KEY_ID: swift.accessKeyId,
  AWS_SECRET_ACCESS_KEY: swift.secretAccessKey,
  XDG_CACHE_HOME: join(directory, "cache"),
};
const stateDir = join(directory, "state");
const daemon = spawn(
  process.execPath,
  [cliPath, "serve", "--state-dir", stateDir, "--fuse-mount", "none", "--nbd-listen", "none"],
  { stdio: "ignore", env },
);
const rows: string[][] = [];
try {
  await new S3Store({
    bucket,
    prefix: "",
    endpoint: swift.endpoint,
    region: swift.region,
    credentials: { accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey },
  }).createBucket();
  for (let attempt = 0; attempt < 100; attempt++) {
    try {
      await run(process.execPath, [cliPath, "status", "--state-dir", stateDir], env);
      break;
    } catch {
      await new Promise((wake) => setTimeout(wake, 100));
    }
  }
  const sizeBytes = sizeMib << 20;
  const image = Buffer.alloc(sizeBytes);
  for (let offset = 0; offset < sizeBytes; offset += 64 << 20)
    randomBytes(Math.min(64 << 20, sizeBytes - offset)).copy(image, offset);
  const backend = join(directory, "b0.img");
  await writeFile(backend, image);
  await run(
    process.execPath,
    [cliPath, "device", "add", "b0", "--backend", backend, "--state-dir", stateDir],
    env,
  );

  const client = new S3Client({
    endpoint: swift.endpoint,
    region: swift.region,
    forcePathStyle: true,
    credentials: { accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey },
  });
  const objects = Math.ceil(sizeBytes / objectBytes);
  const gib = sizeBytes / (1 << 30);

  for (let round = 1; round <= rounds; round++) {
    // blocksnap: a fresh repository each round, so every chunk is new (a full backup that stores all).
    const repo = ["--repo", `s3://${bucket}/blocksnap-${round}`, "--s3-endpoint", swift.endpoint];
    await run(process.execPath, [cliPath, "backup", "init", ...repo], env);
    let log = await requestsSince(swift, 0);
    let started = performance.now();
    await run(
      process.execPath,
      [cliPath, "backup", "run", "b0", ...repo, "--state-dir", stateDir, "--json"],
      env,
    );
    const backupMs = performance.now() - started;
    const backupRequests = await requestsSince(swift, log.lines - 1);
    log = backupRequests;
    const restored = join(directory, "restored.img");
    await rm(restored, { force: true });
    started = performance.now();
    await run(process.execPath, [cliPath, "backup", "restore", "b0/latest", ...repo, "--to", restored], env);
    const restoreMs = performance.now() - started;
    const restoreRequests = await requestsSince(swift, log.lines - 1);
    await rm(restored, { force: true });

    // The reference: the SDK's PUT and GET of the same bytes, 4 MiB objects, 8 in flight.
    started = performance.now();
    await bounded(objects, async (index) => {
      const body = image.subarray(index * objectBytes, Math.min(sizeBytes, (index + 1) * objectBytes));
      await client.send(new PutObjectCommand({ Bucket: bucket, Key: `raw-${round}/${index}`, Body: body }));
    });
    const rawPutMs = performance.now() - started;
    const sink = await open(join(directory, "raw.img"), "w");
    started = performance.now();
    await bounded(objects, async (index) => {
      const answer = await client.send(
        new GetObjectCommand({ Bucket: bucket, Key: `raw-${round}/${index}` }),
      );
      const bytes = await answer.Body?.transformToByteArray();
      if (bytes === undefined) throw new Error("an empty GET");
      await sink.write(bytes, 0, bytes.length, index * objectBytes);
    });
    const rawGetMs = performance.now() - started;
    await sink.close();
    await rm(join(directory, "raw.img"), { force: true });

    const backupRate = mibPerSecond(sizeBytes, backupMs);
    const restoreRate = mibPerSecond(sizeBytes, restoreMs);
    const putRate = mibPerSecond(sizeBytes, rawPutMs);
    const getRate = mibPerSecond(sizeBytes, rawGetMs);
    progress(
      `round ${round}: backup ${backupRate.toFixed(0)} MiB/s (SDK PUT ${putRate.toFixed(0)}), restore ${restoreRate.toFixed(0)} MiB/s (SDK GET ${getRate.toFixed(0)})`,
    );
    rows.push([
      String(round),
      `${backupRate.toFixed(0)} / ${putRate.toFixed(0)} = ${(backupRate / putRate).toFixed(2)}×`,
      `${restoreRate.toFixed(0)} / ${getRate.toFixed(0)} = ${(restoreRate / getRate).toFixed(2)}×`,
      (backupRequests.count / gib).toFixed(0),
      (restoreRequests.count / gib).toFixed(0),
    ]);
  }
  client.destroy();
} finally {
  daemon.kill("SIGTERM");
  await new Promise((wake) => daemon.once("exit", wake));
  await swift.stop();
  await rm(directory, { recursive: true, force: true });
}

const markdown = [
  "## S3 repository on OpenStack Swift (s3api) vs the AWS SDK (`node dist/bench/backup/s3-bench.js`)",
  "",
  machineFactsMarkdown(),
  "",
  `${sizeMib} MiB of random bytes (incompressible), 4 MiB chunks / objects, 8 requests in flight on both sides; a one-replica Swift on the same 2 cores. Wall times of the CLI commands (process start included). Requests counted in Swift's proxy log (S3 requests only), per GiB of image.`,
  "",
  markdownTable(
    [
      "round",
      "backup MiB/s / SDK PUT MiB/s",
      "restore MiB/s / SDK GET MiB/s",
      "requests per GiB, backup",
      "requests per GiB, restore",
    ],
    rows,
  ),
  "",
].join("\n");
await mkdir(dirname(values.out), { recursive: true });
await writeFile(values.out, markdown);
process.stdout.write(markdown);
