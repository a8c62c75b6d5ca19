/**
 * A small ext4 file system on a loop device over a file in `directory`, mounted at `directory/<name>`, for
 * tests that need a real file system under a storage (frozen, full). Its undo steps go on `cleanups`, to
 * run in reverse: unmount, then detach the loop device. Root only; the caller skips otherwise.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { run, runOk } from "./commands.js";
import { attachLoop, detachLoop } from "./loop-device.js";

export async function mountScratchExt4(
  directory: string,
  name: string,
  options: { readonly size: string; readonly mkfsArgs?: readonly string[] },
  cleanups: Array<() => Promise<unknown>>,
): Promise<{ readonly loop: string; readonly mountPoint: string }> {
  const image = join(directory, `${name}.img`);
  await runOk("truncate", ["-s", options.size, image]);
  await runOk("mkfs.ext4", ["-q", "-F", ...(options.mkfsArgs ?? []), image]);
  const loop = await attachLoop(image);
  cleanups.push(() => detachLoop(loop));
  const mountPoint = join(directory, name);
  await mkdir(mountPoint);
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", [mountPoint]));
  return { loop, mountPoint };
}
