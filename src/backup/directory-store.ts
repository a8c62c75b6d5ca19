/**
 * DirectoryStore: an ObjectStore on a local directory, one file per object (key = relative path).
 *
 * A put writes `<dir>/.tmp-<pid>-<n>` beside the final name's directory, fsyncs it, renames it into place
 * and fsyncs the directory, so a crash leaves the old object, the new one, or a temporary file that is
 * never listed (names starting with `.` are not keys) and that garbage collection may remove. No locks:
 * objects are immutable or replaced whole, and rename is atomic.
 */
import { mkdir, open, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { BlockError } from "../block/errors.js";
import { checkObjectKey, type ObjectInfo, type ObjectStore } from "./object-store.js";

let temporaryCounter = 0;

export class DirectoryStore implements ObjectStore {
  readonly location: string;
  readonly rootPath: string;

  constructor(rootPath: string) {
    this.rootPath = rootPath;
    this.location = rootPath;
  }

  private pathOf(key: string): string {
    checkObjectKey(key);
    return join(this.rootPath, key);
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = this.pathOf(key);
    const directory = dirname(path);
    await mkdir(directory, { recursive: true }).catch(storeError(key));
    temporaryCounter += 1;
    const temporaryPath = join(directory, `.tmp-${process.pid}-${temporaryCounter}`);
    try {
      const file = await open(temporaryPath, "wx", 0o600);
      try {
        await file.writeFile(data);
        await file.sync();
      } finally {
        await file.close();
      }
      await rename(temporaryPath, path);
      await syncDirectory(directory);
    } catch (error) {
      await rm(temporaryPath, { force: true }).catch(() => undefined);
      throw storeError(key)(error);
    }
  }

  async get(key: string): Promise<Uint8Array> {
    return await readFile(this.pathOf(key)).catch(storeError(key));
  }

  async getInto(key: string, target: Uint8Array): Promise<number> {
    const file = await open(this.pathOf(key), "r").catch(storeError(key));
    try {
      const { size } = await file.stat();
      if (size > target.length)
        throw new BlockError(
          "EIO",
          `Object ${key} has ${size} bytes, more than the ${target.length} expected`,
        );
      let doneBytes = 0;
      while (doneBytes < size) {
        const { bytesRead } = await file.read(target, doneBytes, size - doneBytes, doneBytes);
        if (bytesRead === 0) throw new BlockError("EIO", `Object ${key} shrank while read`);
        doneBytes += bytesRead;
      }
      return size;
    } catch (error) {
      throw storeError(key)(error);
    } finally {
      await file.close();
    }
  }

  async head(key: string): Promise<ObjectInfo | null> {
    try {
      const info = await stat(this.pathOf(key));
      return { key, sizeBytes: info.size, modifiedMs: info.mtimeMs };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw storeError(key)(error);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    // Walk only the directories the prefix can reach: its directory part, then everything below.
    const slash = prefix.lastIndexOf("/");
    const base = slash < 0 ? "" : prefix.slice(0, slash);
    yield* this.walk(base, prefix);
  }

  private async *walk(relativeDirectory: string, prefix: string): AsyncIterable<ObjectInfo> {
    let entries: import("node:fs").Dirent[];
    try {
      entries = await readdir(join(this.rootPath, relativeDirectory), { withFileTypes: true });
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR") return;
      throw storeError(relativeDirectory)(error);
    }
    for (const entry of entries) {
      if (entry.name.startsWith(".")) continue;
      const key = relativeDirectory === "" ? entry.name : `${relativeDirectory}/${entry.name}`;
      if (entry.isDirectory()) {
        if (key.startsWith(prefix) || prefix.startsWith(`${key}/`)) yield* this.walk(key, prefix);
      } else if (entry.isFile() && key.startsWith(prefix)) {
        const info = await stat(join(this.rootPath, key)).catch(() => null);
        if (info !== null) yield { key, sizeBytes: info.size, modifiedMs: info.mtimeMs };
      }
    }
  }

  async delete(key: string): Promise<void> {
    await rm(this.pathOf(key), { force: true }).catch(storeError(key));
  }
}

async function syncDirectory(path: string): Promise<void> {
  const directory = await open(path, "r");
  try {
    await directory.sync();
  } finally {
    await directory.close();
  }
}

/** Maps a file-system failure to a BlockError naming the object (ENOSPC stays ENOSPC: "disk full"). */
function storeError(key: string): (error: unknown) => never {
  return (error: unknown) => {
    if (error instanceof BlockError) throw error;
    const code = (error as NodeJS.ErrnoException).code;
    const message = error instanceof Error ? error.message : String(error);
    if (code === "ENOENT") throw new BlockError("ENOENT", `Object ${key} not found`);
    if (code === "ENOSPC") throw new BlockError("ENOSPC", `No space left for object ${key}`);
    if (code === "EDQUOT") throw new BlockError("EDQUOT", `Quota exceeded writing object ${key}`);
    if (code === "EACCES" || code === "EPERM") throw new BlockError("EACCES", `${message}`);
    if (code === "EROFS") throw new BlockError("EROFS", `${message}`);
    throw new BlockError("EIO", `Object ${key}: ${message}`);
  };
}
