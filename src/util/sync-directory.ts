/**
 * fsync of a directory: makes the names created, renamed or removed in it durable (a file's own fsync
 * covers its data, not its directory entry).
 */
import { open } from "node:fs/promises";

export async function syncDirectory(path: string): Promise<void> {
  const directory = await open(path, "r");
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
}
