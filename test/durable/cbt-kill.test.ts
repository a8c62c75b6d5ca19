/**
 * CBT through kill -9, with real processes: qemu-io writes 4 KiB blocks at seeded random offsets over NBD
 * while the daemon is killed with SIGKILL at a random moment, five rounds. After each restart the CBT
 * generation is the same, and every write qemu-io saw acknowledged ("wrote …") is reported changed since
 * the last take, both by `cbt read` and by the next take. A simulated host crash (another boot id, through
 * the documented BLOCKSNAP_TEST_BOOT_ID_PATH hook) keeps the generation too and says so in the log.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { CbtInfo } from "../../src/cbt/cbt-map.js";
import { cleanEnvironment, DaemonProcess } from "../cli/cli-harness.js";
import { runOk, which } from "../helpers/commands.js";
import { Prng } from "../helpers/prng.js";

const MiB = 1024 * 1024;
const deviceBytes = 64 * MiB;
let directory = "";
let daemon: DaemonProcess | undefined;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cbt-kill-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

function start(stateDir: string, bootIdPath: string): Promise<DaemonProcess> {
  return DaemonProcess.start(stateDir, {
    env: cleanEnvironment({ BLOCKSNAP_TEST_BOOT_ID_PATH: bootIdPath }),
  });
}

/** Takes (and destroys) a snapshot of d0: the CBT epoch the next writes belong to. */
async function take(current: DaemonProcess): Promise<number> {
  const id = (
    await current.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "d0"])
  ).trim();
  await current.cliOk(["snapshot", "take", id, "--no-freeze"]);
  await current.cliOk(["snapshot", "destroy", id]);
  return (await current.cliJson<CbtInfo>(["cbt", "info", "d0"])).changesNumber;
}

/** Runs qemu-io with `offsets` as 4 KiB writes; resolves with the offsets it saw acknowledged. */
function writeUntilKilled(
  socket: string,
  offsets: readonly number[],
  kill: () => void,
  killAfterMs: number,
): Promise<number[]> {
  const commands = offsets.flatMap((offset) => ["-c", `write -P 7 ${offset} 4k`]);
  const child: ChildProcess = spawn(
    "qemu-io",
    ["-f", "raw", `nbd+unix:///d0?socket=${socket}`, ...commands],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let output = "";
  child.stdout?.setEncoding("utf8").on("data", (text: string) => {
    output += text;
  });
  const timer = setTimeout(kill, killAfterMs);
  return new Promise((resolve) => {
    child.once("exit", () => {
      clearTimeout(timer);
      const acknowledged = [...output.matchAll(/wrote 4096\/4096 bytes at offset (\d+)/g)].map((match) =>
        Number(match[1]),
      );
      resolve(acknowledged);
    });
  });
}

void test("kill -9 during writes, five rounds: the CBT generation is kept and every acknowledged write is reported", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const stateDir = join(directory, "state");
  const bootIdPath = join(directory, "boot_id");
  await writeFile(bootIdPath, "boot-1\n");
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(deviceBytes), backend]);
  daemon = await start(stateDir, bootIdPath);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const generationId = (await daemon.cliJson<CbtInfo>(["cbt", "info", "d0"])).generationId;
  let baseline = await take(daemon);
  for (let round = 0; round < 5; round++) {
    const offsets = Array.from({ length: 400 }, () => random.int(0, deviceBytes / 4096 - 1) * 4096);
    const current = daemon;
    const acknowledged = await writeUntilKilled(
      current.nbdSocket,
      offsets,
      () => current.child.kill("SIGKILL"),
      random.int(50, 400),
    );
    await current.stop("SIGKILL");
    if (round === 3) await writeFile(bootIdPath, "boot-2\n");
    daemon = await start(stateDir, bootIdPath);
    const info = await daemon.cliJson<CbtInfo>(["cbt", "info", "d0"]);
    assert.equal(info.generationId, generationId, `round ${round}: the generation is kept`);
    const crash = round === 3 ? "a host crash" : "a daemon crash";
    await waitForLog(daemon, `recovered after ${crash}`);
    const out = join(directory, `map-${round}`);
    await daemon.cliOk(["cbt", "read", "d0", "--out", out]);
    const readMap = new Uint8Array(await readFile(out));
    for (const offset of acknowledged) {
      const block = Math.floor(offset / info.blockSizeBytes);
      assert.ok(
        readMap[block]! > baseline,
        `round ${round}: acknowledged write at ${offset} is not reported`,
      );
    }
    const taken = await take(daemon);
    assert.ok(taken > baseline);
    baseline = taken;
    t.diagnostic(`round ${round}: ${acknowledged.length} writes acknowledged before the kill`);
  }
});

async function waitForLog(current: DaemonProcess, text: string): Promise<void> {
  for (let attempt = 0; attempt < 50 && !current.stderr.includes(text); attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.ok(current.stderr.includes(text), `the log says "${text}":\n${current.stderr}`);
}
