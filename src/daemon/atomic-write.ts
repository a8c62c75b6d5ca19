/**
 * Atomic replacement of a small file: write `<path>.tmp-<pid>`, fsync it, rename it over `path`, fsync the
 * directory. A crash at any point leaves either the old or the new content, never a torn file (the rename
 * is atomic and the fsyncs order the data before the name). Callers serialise their own writes.
 * `durable: false` skips both fsyncs: still atomic for a process crash, for a file that needs to outlive
 * the process only (a hand-over to a successor that reads it at once).
 */
import { open, rename, rm } from "node:fs/promises";
import { dirname } from "node:path";

export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  mode = 0o600,
  options: { readonly durable?: boolean } = {},
): Promise<void> {
  const durable = options.durable !== false;
  const temporaryPath = `${path}.tmp-${process.pid}`;
  const file = await open(temporaryPath, "w", mode);
  try {
    await file.writeFile(data);
    if (durable) await file.sync();
  } catch (error) {
    await file.close();
    await rm(temporaryPath, { force: true });
    throw error;
  }
  await file.close();
  try {
    await rename(temporaryPath, path);
  } catch (error) {
    await rm(temporaryPath, { force: true });
    throw error;
  }
  if (!durable) return;
  const directory = await open(dirname(path), "r");
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
}
