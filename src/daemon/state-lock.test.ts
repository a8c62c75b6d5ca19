import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError } from "../block/errors.js";
import { silentLogger } from "../util/logger.js";
import { isProcessAlive, StateLock } from "./state-lock.js";

let directory = "";
before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-lock-"));
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** The pid of a process that has exited and been reaped. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
  await new Promise((resolve) => child.once("exit", resolve));
  assert.ok(child.pid !== undefined);
  return child.pid;
}

void test("StateLock.acquire() writes our pid and release() removes the file", async () => {
  const path = join(directory, "a.lock");
  const lock = await StateLock.acquire(path, silentLogger);
  assert.equal((await readFile(path, "utf8")).trim(), String(process.pid));
  await lock.release();
  await assert.rejects(stat(path), { code: "ENOENT" });
  await lock.release();
});

void test("StateLock.acquire() refuses a lock held by a live process with EBUSY naming the pid", async () => {
  const path = join(directory, "b.lock");
  const holder = spawn(process.execPath, ["-e", "setTimeout(() => {}, 60000)"], { stdio: "ignore" });
  try {
    await writeFile(path, `${holder.pid}\n`);
    await assert.rejects(StateLock.acquire(path, silentLogger), (error: unknown) => {
      assert.ok(error instanceof BlockError);
      assert.equal(error.errno, "EBUSY");
      assert.match(error.message, new RegExp(`pid ${holder.pid}`));
      return true;
    });
    assert.equal((await readFile(path, "utf8")).trim(), String(holder.pid));
  } finally {
    holder.kill("SIGKILL");
  }
});

void test("StateLock.acquire() takes over a lock left by a dead process, or a garbled one", async () => {
  for (const content of [`${await deadPid()}\n`, "garbage", ""]) {
    const path = join(directory, "c.lock");
    await writeFile(path, content);
    const lock = await StateLock.acquire(path, silentLogger);
    assert.equal((await readFile(path, "utf8")).trim(), String(process.pid));
    await lock.release();
  }
});

void test("isProcessAlive() tells live, dead and zombie processes apart", async () => {
  assert.equal(isProcessAlive(process.pid), true);
  assert.equal(isProcessAlive(await deadPid()), false);
  // `sleep 0` exits while its parent (exec'd into `sleep 30`) never reaps it: a zombie.
  const parent = spawn("/bin/sh", ["-c", "sleep 0 & echo $!; exec sleep 30"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  try {
    const zombiePid = Number(
      (await new Promise<Buffer>((resolve) => parent.stdout.once("data", resolve))).toString(),
    );
    let state = "";
    for (let attempt = 0; attempt < 200 && state !== "Z"; attempt++) {
      const text = await readFile(`/proc/${zombiePid}/stat`, "utf8");
      state = text.slice(text.lastIndexOf(")") + 2, text.lastIndexOf(")") + 3);
      if (state !== "Z") await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.equal(state, "Z");
    assert.equal(isProcessAlive(zombiePid), false);
  } finally {
    parent.kill("SIGKILL");
  }
});
