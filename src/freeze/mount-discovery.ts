/**
 * Finds the local file systems that sit on blocksnap's devices: loop devices whose backing file is the
 * FUSE file of a device (/sys/block/loop* /loop/backing_file), then the mounts of those loop devices by
 * major:minor (/proc/self/mountinfo). Read-only: it only looks at sysfs and procfs. Synchronous on purpose:
 * these pseudo-files never wait for I/O, and never on blocksnap's own FUSE files.
 */
import { readdirSync, readFileSync } from "node:fs";
import { readMountInfoSync } from "../util/mount-info.js";

export interface LoopMount {
  readonly backingFile: string;
  readonly loopDevice: string;
  readonly mountPoint: string;
  readonly fsType: string;
}

/** Loop devices and their backing files, e.g. { loopDevice: "/dev/loop3", backingFile, majorMinor: "7:3" }. */
export function listLoopDevices(
  sysBlock = "/sys/block",
): Array<{ loopDevice: string; backingFile: string; majorMinor: string }> {
  const found: Array<{ loopDevice: string; backingFile: string; majorMinor: string }> = [];
  let names: string[];
  try {
    names = readdirSync(sysBlock).filter((name) => name.startsWith("loop"));
  } catch {
    return found;
  }
  for (const name of names) {
    try {
      const backingFile = readFileSync(`${sysBlock}/${name}/loop/backing_file`, "utf8").trim();
      const majorMinor = readFileSync(`${sysBlock}/${name}/dev`, "utf8").trim();
      found.push({ loopDevice: `/dev/${name}`, backingFile, majorMinor });
    } catch {
      // An unbound loop device has no backing_file.
    }
  }
  return found;
}

/**
 * The file system on each loop device whose backing file is one of `backingFiles`, at its first mount
 * point. One per loop device, not one per mount: a bind mount or a second mount of the same device is the
 * same super block, and freezing it twice fails (EBUSY) while one thaw thaws it for all.
 */
export function findLoopMounts(backingFiles: readonly string[]): LoopMount[] {
  const wanted = new Set(backingFiles);
  return loopMountsOf(listLoopDevices().filter((loop) => wanted.has(loop.backingFile)));
}

/** The file systems on loop devices over any file inside `directory` (a FUSE mount's files). */
export function findLoopMountsUnder(directory: string): LoopMount[] {
  const prefix = directory.endsWith("/") ? directory : `${directory}/`;
  return loopMountsOf(listLoopDevices().filter((loop) => loop.backingFile.startsWith(prefix)));
}

function loopMountsOf(loops: ReturnType<typeof listLoopDevices>): LoopMount[] {
  if (loops.length === 0) return [];
  const mounts = readMountInfoSync();
  const result: LoopMount[] = [];
  for (const loop of loops) {
    for (const mount of mounts) {
      if (mount.majorMinor !== loop.majorMinor) continue;
      result.push({
        backingFile: loop.backingFile,
        loopDevice: loop.loopDevice,
        mountPoint: mount.mountPoint,
        fsType: mount.fsType,
      });
      break;
    }
  }
  return result;
}
