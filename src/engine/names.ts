/**
 * Validation of user-chosen names (docs/design/semantics.md): the one rule for device names, used by the
 * engine, the control API's schemas and so the CLI. A device name becomes an NBD export name, a FUSE file
 * name and a command-line argument, so it is refused when it could be read as something else there: a
 * path (`/`, `..`), an option (a leading `-`), a hidden or relative file (a leading `.`), or text that does
 * not print (NUL, control characters, anything outside A-Z a-z 0-9 . _ -).
 */
import { BlockError } from "../block/errors.js";

export const deviceNameCharsMax = 64;
const deviceNamePattern = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;

/** Why `name` is not a valid device name, or null when it is. */
export function deviceNameProblem(name: unknown): string | null {
  if (typeof name !== "string") return "a device name is a string";
  if (name.length === 0 || name.length > deviceNameCharsMax)
    return `use 1 to ${deviceNameCharsMax} characters`;
  if (name.startsWith("-")) return "it must not start with - (it would read as an option)";
  if (name.startsWith(".")) return "it must not start with . (it would read as a hidden or relative path)";
  if (name.includes("..")) return "it must not contain .. (it would read as a parent directory)";
  if (!deviceNamePattern.test(name)) {
    return "use only A-Z a-z 0-9 . _ - (no /, spaces, NUL or control characters)";
  }
  return null;
}

export function checkDeviceName(name: unknown): asserts name is string {
  const problem = deviceNameProblem(name);
  if (problem !== null) {
    const shown = typeof name === "string" && name.length > 80 ? `${name.slice(0, 80)}…` : name;
    throw new BlockError("EINVAL", `Invalid device name ${JSON.stringify(shown)}: ${problem}`);
  }
}

/** Export name of a snapshot image. */
export function imageExportName(deviceName: string, snapshotId: string): string {
  return `${deviceName}@${snapshotId}`;
}
