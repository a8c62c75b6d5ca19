// Benchmark (not a test): NBD over TLS (PSK), blocksnap against nbdkit (--tls=require --tls-psk, file
// plugin) on the same page-cache-hot file, each also in plain text, in one run: nbdcopy sequential read of
// the whole file, and 4 KiB random reads at QD32 from a python3-libnbd loop (the same client for both).
// Unix sockets; best of two rounds. Usage (root not needed; after tsc):
//   node dist/bench/nbd/tls-bench.js [--size-mib 1024] [--runtime-s 5] [--out bench/results/tls.md]
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "1024" },
    "runtime-s": { type: "string", default: "5" },
    out: { type: "string", default: "bench/results/tls.md" },
  },
});
const sizeMib = Number(values["size-mib"]);
const runtimeSeconds = Number(values["runtime-s"]);
const cliPath = join(resolve(dirname(fileURLToPath(import.meta.url)), "../../.."), "dist/src/cli/main.js");

function run(file: string, args: readonly string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

async function waitForSocket(path: string): Promise<void> {
  for (let attempt = 0; attempt < 200 && !existsSync(path); attempt++) {
    await new Promise((wake) => setTimeout(wake, 50));
  }
}

interface Server {
  readonly name: string;
  readonly uri: (tls: boolean) => string;
  stop(): Promise<void>;
}

let startCount = 0;

async function startBlocksnap(directory: string, file: string, keys: string, tls: boolean): Promise<Server> {
  startCount += 1;
  const stateDir = join(directory, `blocksnap-${startCount}`);
  const child = spawn(
    process.execPath,
    [cliPath, "serve", "--state-dir", stateDir, "--fuse-mount", "none", ...(tls ? ["--tls-psk", keys] : [])],
    { stdio: "ignore" },
  );
  const socket = join(stateDir, "nbd.sock");
  await waitForSocket(join(stateDir, "blocksnap.sock"));
  await run(process.execPath, [cliPath, "device", "add", "d0", "--backend", file, "--state-dir", stateDir]);
  return {
    name: "blocksnap",
    uri: (secure) =>
      secure
        ? `nbds+unix://alice@/d0?socket=${socket}&tls-psk-file=${keys}`
        : `nbd+unix:///d0?socket=${socket}`,
    stop: () => stop(child),
  };
}

async function startNbdkit(directory: string, file: string, keys: string, tls: boolean): Promise<Server> {
  startCount += 1;
  const socket = join(directory, `nbdkit-${startCount}.sock`);
  const child = spawn(
    "nbdkit",
    ["-f", "-U", socket, ...(tls ? ["--tls=require", `--tls-psk=${keys}`] : []), "file", `file=${file}`],
    { stdio: "ignore" },
  );
  await waitForSocket(socket);
  return {
    name: "nbdkit",
    uri: (secure) =>
      secure ? `nbds+unix://alice@/?socket=${socket}&tls-psk-file=${keys}` : `nbd+unix:///?socket=${socket}`,
    stop: () => stop(child),
  };
}

function stop(child: ChildProcess): Promise<void> {
  return new Promise((resolvePromise) => {
    if (child.exitCode !== null) return resolvePromise();
    child.once("exit", () => resolvePromise());
    child.kill("SIGTERM");
  });
}

async function nbdcopyMiBps(uri: string): Promise<number> {
  const started = performance.now();
  await run("nbdcopy", [uri, "null:"]);
  return sizeMib / ((performance.now() - started) / 1000);
}

/**
 * 4 KiB random reads at QD32 for runtimeSeconds through python3-libnbd's async API (fio's nbd engine
 * refuses the URI's tls-psk-file: libnbd forbids local files in URIs unless the program allows them).
 */
const randomReadScript = `
import nbd, random, sys, time
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
size = h.get_size()
blocks = size // 4096
seconds = float(sys.argv[2])
done = 0
inflight = 0
def finished(error):
    global done, inflight
    done += 1
    inflight -= 1
    return 1
buffers = [nbd.Buffer(4096) for _ in range(32)]
end = time.monotonic() + seconds
index = 0
while time.monotonic() < end:
    while inflight < 32:
        h.aio_pread(buffers[index % 32], random.randrange(blocks) * 4096, completion=finished)
        inflight += 1
        index += 1
    h.poll(-1)
while inflight > 0:
    h.poll(-1)
print(done / seconds)
`;

async function randomReadIops(uri: string): Promise<number> {
  return Number(
    (await run("/usr/bin/python3", ["-c", randomReadScript, uri, String(runtimeSeconds)])).trim(),
  );
}

const directory = await mkdtemp(join(tmpdir(), "blocksnap-bench-tls-"));
try {
  const file = join(directory, "disk.img");
  await run("dd", ["if=/dev/urandom", `of=${file}`, "bs=1M", `count=${sizeMib}`, "status=none"]);
  await run("cat", [file]).catch(() => "");
  const keys = join(directory, "keys.psk");
  await run("psktool", ["-u", "alice", "-p", keys]);
  const results = new Map<string, { copy: number; fio: number }>();
  for (let round = 0; round < 2; round++) {
    for (const start of [startBlocksnap, startNbdkit]) {
      for (const tls of [false, true]) {
        const server = await start(directory, file, keys, tls);
        try {
          const uri = server.uri(tls);
          const copy = await nbdcopyMiBps(uri);
          const iops = await randomReadIops(uri);
          const key = `${server.name} ${tls ? "TLS" : "plain"}`;
          const previous = results.get(key);
          results.set(key, {
            copy: Math.max(copy, previous?.copy ?? 0),
            fio: Math.max(iops, previous?.fio ?? 0),
          });
          process.stdout.write(
            `round ${round + 1} ${key}: nbdcopy ${copy.toFixed(0)} MiB/s, randread ${iops.toFixed(0)} IOPS\n`,
          );
        } finally {
          await server.stop();
        }
      }
    }
  }
  const get = (key: string) => results.get(key) ?? { copy: Number.NaN, fio: Number.NaN };
  const ours = get("blocksnap TLS");
  const theirs = get("nbdkit TLS");
  const lines = [
    "## NBD over TLS (PSK): blocksnap vs nbdkit",
    "",
    `Unix sockets, a ${sizeMib} MiB page-cache-hot file, TLS 1.2 PSK (psktool key), best of two rounds.`,
    "",
    "| server | nbdcopy seq read plain (MiB/s) | TLS (MiB/s) | TLS / plain | 4K randread QD32 plain (IOPS, python3-libnbd) | TLS (IOPS) | TLS / plain |",
    "|---|---|---|---|---|---|---|",
    ...["blocksnap", "nbdkit"].map((name) => {
      const plain = get(`${name} plain`);
      const secure = get(`${name} TLS`);
      return `| ${name} | ${plain.copy.toFixed(0)} | ${secure.copy.toFixed(0)} | ${(secure.copy / plain.copy).toFixed(2)} | ${plain.fio.toFixed(0)} | ${secure.fio.toFixed(0)} | ${(secure.fio / plain.fio).toFixed(2)} |`;
    }),
    "",
    `blocksnap / nbdkit over TLS: nbdcopy ${(ours.copy / theirs.copy).toFixed(2)}×, 4K randread ${(ours.fio / theirs.fio).toFixed(2)}×.`,
    "",
  ];
  await mkdir(dirname(values.out), { recursive: true });
  await writeFile(values.out, lines.join("\n"));
  process.stdout.write(lines.join("\n"));
} finally {
  await rm(directory, { recursive: true, force: true });
}
