/**
 * BufferPool: recycles the large buffers of READ replies. A fresh 256 KiB Buffer is a fresh mmap from
 * malloc: every request then pays page faults in pread plus the munmap and the GC pressure of external
 * memory, which cost about half of the sequential-read throughput (measured with --cpu-prof: `read` at 22%
 * of the server's CPU, GC at 8%). Buffers go back to the pool once the socket has handed them to the kernel
 * (the write callback), never earlier.
 *
 * Free lists are kept per exact byte length (clients repeat the same request sizes), bounded in total
 * bytes; beyond the bound released buffers are simply dropped to the GC. One event loop, no locks.
 *
 * A `shared` pool (WRITE payloads) allocates its pooled sizes in SharedArrayBuffers: the file system
 * writer thread writes such a payload where it is instead of copying it into its staging buffer
 * (src/backends/fs-writer.ts).
 */
import { assert } from "../util/assert.js";

export class BufferPool {
  private readonly freeLists = new Map<number, Buffer[]>();
  private readonly pooledBytesMax: number;
  private readonly bufferBytesMin: number;
  private readonly shared: boolean;
  private pooledBytes = 0;

  constructor(options: {
    readonly pooledBytesMax: number;
    readonly bufferBytesMin: number;
    readonly shared?: boolean;
  }) {
    assert(options.pooledBytesMax >= 0 && options.bufferBytesMin > 0);
    this.pooledBytesMax = options.pooledBytesMax;
    this.bufferBytesMin = options.bufferBytesMin;
    this.shared = options.shared ?? false;
  }

  /** Bytes currently held by free lists. */
  get freeBytes(): number {
    return this.pooledBytes;
  }

  /** A buffer of exactly `lengthBytes` with undefined contents. */
  acquire(lengthBytes: number): Buffer {
    if (lengthBytes >= this.bufferBytesMin) {
      const buffer = this.freeLists.get(lengthBytes)?.pop();
      if (buffer) {
        this.pooledBytes -= lengthBytes;
        return buffer;
      }
    }
    // Small buffers come from Node's shared slab; pooled sizes need their own ArrayBuffer.
    if (lengthBytes < this.bufferBytesMin) return Buffer.allocUnsafe(lengthBytes);
    return this.shared
      ? Buffer.from(new SharedArrayBuffer(lengthBytes))
      : Buffer.allocUnsafeSlow(lengthBytes);
  }

  /** Gives back a buffer from acquire() that nothing references any more. */
  release(buffer: Buffer): void {
    const lengthBytes = buffer.byteLength;
    if (lengthBytes < this.bufferBytesMin) return;
    assert(
      buffer.byteOffset === 0 && buffer.buffer.byteLength === lengthBytes,
      "only whole buffers are pooled",
    );
    if (this.pooledBytes + lengthBytes > this.pooledBytesMax) return;
    let list = this.freeLists.get(lengthBytes);
    if (!list) {
      list = [];
      this.freeLists.set(lengthBytes, list);
    }
    list.push(buffer);
    this.pooledBytes += lengthBytes;
  }
}
