/**
 * Atomic replacement of a small file: write `<path>.tmp-<pid>`, fsync it, rename it over `path`, fsync the
 * directory. A crash at any point leaves either the old or the new content, never a torn file (the rename
 * is atomic and the fsyncs order the data before the name). Callers serialise their own writes.
 */
import { open, rename, rm } from "node:fs/promises";
import { dirname } from "node:path";
import { syncDirectory } from "../util/sync-directory.js";

export async function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o600): Promise<void> {
  const temporaryPath = `${path}.tmp-${process.pid}`;
  const file = await open(temporaryPath, "w", mode);
  try {
    await file.writeFile(data);
    await file.sync();
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
  await syncDirectory(dirname(path));
}
