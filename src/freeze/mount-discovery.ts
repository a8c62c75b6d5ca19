/**
 * Finds the local file systems that sit on blocksnap's devices: loop devices whose backing file is the
 * FUSE file of a device (/sys/block/loop* /loop/backing_file), then the mounts of those loop devices by
 * major:minor (/proc/self/mountinfo). Read-only: it only looks at sysfs and procfs. Synchronous on purpose:
 * these pseudo-files never wait for I/O, and never on blocksnap's own FUSE files.
 */
import { readdirSync, readFileSync } from "node:fs";

export interface LoopMount {
  readonly backingFile: string;
  readonly loopDevice: string;
  readonly mountPoint: string;
  readonly fsType: string;
}

export interface MountInfoEntry {
  readonly majorMinor: string;
  readonly mountPoint: string;
  readonly fsType: string;
  readonly source: string;
}

/** Parses /proc/self/mountinfo (proc(5)): "id parent maj:min root mountpoint opts [optional...] - fstype source superopts". */
export function parseMountInfo(text: string): MountInfoEntry[] {
  const entries: MountInfoEntry[] = [];
  for (const line of text.split("\n")) {
    if (!line) continue;
    const fields = line.split(" ");
    const separator = fields.indexOf("-");
    const majorMinor = fields[2];
    const mountPoint = fields[4];
    const fsType = fields[separator + 1];
    const source = fields[separator + 2];
    if (separator < 6 || !majorMinor || !mountPoint || !fsType || source === undefined) continue;
    entries.push({
      majorMinor,
      mountPoint: unescapeMountField(mountPoint),
      fsType,
      source: unescapeMountField(source),
    });
  }
  return entries;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
export function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));
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
  const loops = listLoopDevices().filter((loop) => wanted.has(loop.backingFile));
  if (loops.length === 0) return [];
  const mounts = parseMountInfo(readFileSync("/proc/self/mountinfo", "utf8"));
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
