/**
 * Loop devices for tests that run beside other tests (`--test-concurrency=2`). A detached /dev/loopN is
 * handed to the next `losetup -f` at once, maybe another test's, so a cleanup that detaches "its" number a
 * second time (or after the kernel let it go) cuts off someone else's file system. attachLoop remembers the
 * device's disk sequence number (/sys/block/loopN/diskseq: the kernel bumps it at every attach and detach,
 * so it names one attachment, even after the backing file's mount went away and its path and inode can no
 * longer be read) and detachLoop detaches only while it is unchanged, and only once. Root only; callers skip
 * otherwise.
 */
import { readFile } from "node:fs/promises";
import { run, runOk } from "./commands.js";

const attached = new Map<string, string>();

function diskSequence(loop: string): Promise<string> {
  return readFile(`/sys/block/${loop.replace("/dev/", "")}/diskseq`, "utf8").then(
    (text) => text.trim(),
    () => "",
  );
}

/** `losetup -f --show [options] file`; returns the device (/dev/loopN). */
export async function attachLoop(file: string, options: readonly string[] = []): Promise<string> {
  const loop = (await runOk("losetup", [...options, "-f", "--show", file])).trim();
  attached.set(loop, await diskSequence(loop));
  return loop;
}

/** Detaches `loop` if this process attached it and it was not detached since; a no-op otherwise. */
export async function detachLoop(loop: string): Promise<void> {
  const sequence = attached.get(loop);
  if (sequence === undefined) return;
  attached.delete(loop);
  if (sequence !== "" && (await diskSequence(loop)) === sequence) await run("losetup", ["-d", loop]);
}

/** Like detachLoop, but throws when `losetup -d` fails (a test step that must detach, e.g. before EBUSY checks). */
export async function detachLoopOk(loop: string): Promise<void> {
  const sequence = attached.get(loop);
  if (sequence === undefined) throw new Error(`${loop} was not attached by this test`);
  attached.delete(loop);
  await runOk("losetup", ["-d", loop]);
}
