/**
 * DirectoryStore: an ObjectStore on a local directory, one file per object (key = relative path).
 *
 * A put writes `<dir>/.tmp-<pid>-<n>` beside the final name's directory, fsyncs it, renames it into place
 * and fsyncs the directory, so a crash leaves the old object, the new one, or a temporary file that is
 * never listed (names starting with `.` are not keys) and that garbage collection may remove. No locks:
 * objects are immutable or replaced whole, and rename is atomic.
 *
 * putPending (a backup's chunks) defers the durability of a batch: each object is written to its temporary
 * file and left open; a batch (64 objects or 256 MiB, or syncPending) fsyncs all of them in parallel
 * (the file system joins them into few journal commits instead of two per chunk), then renames them into
 * place and fsyncs each directory once. An object is renamed only after its bytes are durable, so a crash
 * never leaves a chunk name with unwritten bytes (a later backup would trust it by its name).
 */
import { type FileHandle, mkdir, open, readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { BlockError } from "../block/errors.js";
import { syncDirectory } from "../util/sync-directory.js";
import { checkObjectKey, type ObjectInfo, type ObjectStore } from "./object-store.js";

let temporaryCounter = 0;
const pendingObjectsMax = 64;
const pendingBytesMax = 256 << 20;
/** fsyncs in flight at once while a batch is made durable. */
const syncsInFlight = 16;

interface PendingObject {
  readonly key: string;
  readonly path: string;
  readonly temporaryPath: string;
  readonly file: FileHandle;
}

export class DirectoryStore implements ObjectStore {
  readonly location: string;
  readonly rootPath: string;

  constructor(rootPath: string) {
    this.rootPath = rootPath;
    this.location = rootPath;
  }

  private pending: PendingObject[] = [];
  private pendingBytes = 0;

  private pathOf(key: string): string {
    checkObjectKey(key);
    return join(this.rootPath, key);
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = this.pathOf(key);
    const directory = dirname(path);
    await mkdir(directory, { recursive: true }).catch(storeError(this.rootPath, key));
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
      throw storeError(this.rootPath, key)(error);
    }
  }

  async putPending(key: string, data: Uint8Array): Promise<void> {
    const path = this.pathOf(key);
    const directory = dirname(path);
    await mkdir(directory, { recursive: true }).catch(storeError(this.rootPath, key));
    temporaryCounter += 1;
    const temporaryPath = join(directory, `.tmp-${process.pid}-${temporaryCounter}`);
    const file = await open(temporaryPath, "wx", 0o600).catch(storeError(this.rootPath, key));
    try {
      await file.writeFile(data);
    } catch (error) {
      await file.close().catch(() => undefined);
      await rm(temporaryPath, { force: true }).catch(() => undefined);
      throw storeError(this.rootPath, key)(error);
    }
    this.pending.push({ key, path, temporaryPath, file });
    this.pendingBytes += data.length;
    if (this.pending.length >= pendingObjectsMax || this.pendingBytes >= pendingBytesMax)
      await this.syncPending();
  }

  async syncPending(): Promise<void> {
    const batch = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    let failure: unknown = null;
    await inParallel(batch, syncsInFlight, async (object) => {
      try {
        if (failure === null) await object.file.sync();
      } catch (error) {
        failure ??= storeError(this.rootPath, object.key)(error);
      } finally {
        await object.file.close().catch(() => undefined);
      }
    });
    if (failure === null) {
      try {
        for (const object of batch) await rename(object.temporaryPath, object.path);
      } catch (error) {
        failure = storeError(this.rootPath, "a batch of chunks")(error);
      }
    }
    if (failure !== null) {
      await inParallel(batch, syncsInFlight, (object) =>
        rm(object.temporaryPath, { force: true }).catch(() => undefined),
      );
      throw failure;
    }
    await inParallel([...new Set(batch.map((object) => dirname(object.path)))], syncsInFlight, (directory) =>
      syncDirectory(directory).catch(storeError(this.rootPath, directory)),
    );
  }

  async get(key: string): Promise<Uint8Array> {
    return await readFile(this.pathOf(key)).catch(storeError(this.rootPath, key));
  }

  async getInto(key: string, target: Uint8Array): Promise<number> {
    const file = await open(this.pathOf(key), "r").catch(storeError(this.rootPath, key));
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
      throw storeError(this.rootPath, key)(error);
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
      throw storeError(this.rootPath, key)(error);
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
      throw storeError(this.rootPath, relativeDirectory)(error);
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
    await rm(this.pathOf(key), { force: true }).catch(storeError(this.rootPath, key));
  }
}

/** Runs `work` over `items`, at most `limit` at a time; the first failure is thrown after all ended. */
async function inParallel<T>(
  items: readonly T[],
  limit: number,
  work: (item: T) => Promise<unknown>,
): Promise<void> {
  let next = 0;
  let failure: unknown = null;
  const lane = async () => {
    while (next < items.length) {
      const item = items[next] as T;
      next += 1;
      await work(item).catch((error: unknown) => {
        failure ??= error;
      });
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  if (failure !== null) throw failure;
}

/**
 * Maps a file-system failure to a BlockError naming the object (ENOSPC stays ENOSPC: "disk full"); a full
 * file system or quota also names the repository, the one thing a user can act on.
 */
function storeError(rootPath: string, key: string): (error: unknown) => never {
  return (error: unknown) => {
    if (error instanceof BlockError) throw error;
    const code = (error as NodeJS.ErrnoException).code;
    const message = error instanceof Error ? error.message : String(error);
    if (code === "ENOENT") throw new BlockError("ENOENT", `Object ${key} not found`);
    if (code === "ENOSPC")
      throw new BlockError(
        "ENOSPC",
        `No space left on the file system of repository ${rootPath} (writing ${key})`,
      );
    if (code === "EDQUOT")
      throw new BlockError("EDQUOT", `Quota exceeded in repository ${rootPath} (writing ${key})`);
    if (code === "EACCES" || code === "EPERM") throw new BlockError("EACCES", `${message}`);
    if (code === "EROFS") throw new BlockError("EROFS", `${message}`);
    throw new BlockError("EIO", `Object ${key}: ${message}`);
  };
}
