/**
 * The one seam every durable write of the region journal goes through: positioned writes and fdatasync
 * on one file. The daemon uses files (NodePersistFile); the crash-consistency harness records each call
 * to build the states a crash could leave (test/durable/cbt-crash-harness.test.ts).
 */
import { constants } from "node:fs";
import { type FileHandle, open } from "node:fs/promises";
import { toBlockError } from "../block/errors.js";

export interface PersistFile {
  /** Writes all of `data` at `positionBytes` (not durable until sync()). */
  write(positionBytes: number, data: Uint8Array): Promise<void>;
  /** fdatasync: every write before it is durable when it resolves. */
  sync(): Promise<void>;
  /** The whole file as it is now (recovery). */
  readAll(): Promise<Uint8Array>;
  close(): Promise<void>;
}

export class NodePersistFile implements PersistFile {
  private readonly handle: FileHandle;

  private constructor(handle: FileHandle) {
    this.handle = handle;
  }

  /** Opens `path` for reading and writing, creating it (mode 0600) when absent. */
  static async open(path: string): Promise<NodePersistFile> {
    try {
      return new NodePersistFile(await open(path, constants.O_RDWR | constants.O_CREAT, 0o600));
    } catch (error) {
      throw toBlockError(error, `cannot open ${path}`);
    }
  }

  async write(positionBytes: number, data: Uint8Array): Promise<void> {
    let doneBytes = 0;
    while (doneBytes < data.byteLength) {
      const { bytesWritten } = await this.handle.write(
        data,
        doneBytes,
        data.byteLength - doneBytes,
        positionBytes + doneBytes,
      );
      doneBytes += bytesWritten;
    }
  }

  sync(): Promise<void> {
    return this.handle.datasync();
  }

  async readAll(): Promise<Uint8Array> {
    return new Uint8Array(await this.handle.readFile());
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}
