/**
 * /proc/self/mountinfo, parsed once for every part that needs the mount table (the FUSE face's stale-mount
 * handling, the freezer's discovery of file systems on loop devices). Format (proc(5)):
 * "id parent maj:min root mountpoint opts [optional…] - fstype source superopts"; mount points and sources
 * are octal-escaped (\040 for a space).
 */
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";

export interface MountInfoEntry {
  readonly mountId: number;
  /** "major:minor" of the mounted device, as sysfs's dev files spell it. */
  readonly majorMinor: string;
  /** The same as the kernel's dev_t (major << 20 | minor): the fusectl connection name. */
  readonly deviceNumber: number;
  readonly mountPoint: string;
  readonly fsType: string;
  readonly source: string;
}

export function parseMountInfo(text: string): MountInfoEntry[] {
  const entries: MountInfoEntry[] = [];
  for (const line of text.split("\n")) {
    if (line.length === 0) continue;
    const fields = line.split(" ");
    const separator = fields.indexOf("-");
    if (separator < 6) continue;
    const majorMinor = fields[2] ?? "";
    const [major, minor] = majorMinor.split(":").map((part) => Number.parseInt(part, 10));
    if (major === undefined || minor === undefined || Number.isNaN(major) || Number.isNaN(minor)) continue;
    entries.push({
      mountId: Number.parseInt(fields[0] ?? "", 10),
      majorMinor,
      deviceNumber: major * 2 ** 20 + minor,
      mountPoint: unescapeMountField(fields[4] ?? ""),
      fsType: fields[separator + 1] ?? "",
      source: unescapeMountField(fields[separator + 2] ?? ""),
    });
  }
  return entries;
}

export async function readMountInfo(): Promise<MountInfoEntry[]> {
  return parseMountInfo(await readFile("/proc/self/mountinfo", "utf8"));
}

/** Synchronous: procfs never waits for I/O (and never on blocksnap's own FUSE files). */
export function readMountInfoSync(): MountInfoEntry[] {
  return parseMountInfo(readFileSync("/proc/self/mountinfo", "utf8"));
}

function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_match, octal: string) =>
    String.fromCharCode(Number.parseInt(octal, 8)),
  );
}
