/**
 * A PersistFile over a FileBackend: its writes go to the file system's writer thread (batched with the
 * other writes of that file system, off the event loop), which matters for records written on the
 * copy-before-write path (the chunk log). Reading back is a plain readFile at recovery.
 */
import { readFile } from "node:fs/promises";
import { FileBackend } from "../backends/file-backend.js";
import { toBlockError } from "../block/errors.js";
import type { PersistFile } from "./persist-file.js";

export class BackendPersistFile implements PersistFile {
  private readonly backend: FileBackend;
  private readonly path: string;

  private constructor(path: string, backend: FileBackend) {
    this.path = path;
    this.backend = backend;
  }

  /** Opens `path`, creating it empty when absent. */
  static open(path: string): BackendPersistFile {
    return new BackendPersistFile(path, FileBackend.open(path, { sizeBytes: 0 }));
  }

  write(positionBytes: number, data: Uint8Array): Promise<void> {
    return this.backend.write(positionBytes, data);
  }

  sync(): Promise<void> {
    return this.backend.flush();
  }

  async readAll(): Promise<Uint8Array> {
    try {
      return new Uint8Array(await readFile(this.path));
    } catch (error) {
      throw toBlockError(error, `cannot read ${this.path}`);
    }
  }

  close(): Promise<void> {
    return this.backend.close();
  }
}
