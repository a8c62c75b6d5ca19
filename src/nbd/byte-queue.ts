/**
 * ByteQueue: the bytes received on a socket and not parsed yet, as the list of chunks Node delivered.
 * The parser asks for N contiguous bytes (a header); when they sit in one chunk it reads them in place,
 * otherwise they are copied into a scratch buffer once. Payloads are taken as a view of the chunk when
 * they fit in it (no copy) or copied into a new buffer. The queue never grows on its own: the connection
 * stops reading the socket (pause) when it stops parsing, so it holds at most what arrived before that.
 *
 * A queue whose chunks are views of a reused receive buffer (in-place reads, in-place-socket.ts) does not
 * lend views (`lendsViews` false): take() copies, and the connection calls ownBytes() before the region
 * the queue still holds is read into again.
 *
 * Single-threaded, no locks. Chunks are never modified by the queue.
 */
import { assert } from "../util/assert.js";
import { copyBytes } from "../util/shared-copy.js";

const scratchBytes = 64;

export class ByteQueue {
  private chunks: Buffer[] = [];
  private headIndex = 0;
  /** Consumed bytes of chunks[headIndex]. */
  private headOffsetBytes = 0;
  private lengthBytesInternal = 0;
  private readonly scratch = Buffer.allocUnsafe(scratchBytes);
  /** Where the bytes returned by the last peek() start in the returned buffer. */
  peekOffsetBytes = 0;
  private readonly lendsViews: boolean;

  constructor(options: { readonly lendsViews: boolean } = { lendsViews: true }) {
    this.lendsViews = options.lendsViews;
  }

  get lengthBytes(): number {
    return this.lengthBytesInternal;
  }

  push(chunk: Buffer): void {
    if (chunk.byteLength === 0) return;
    this.chunks.push(chunk);
    this.lengthBytesInternal += chunk.byteLength;
  }

  /**
   * Returns a buffer holding the next `lengthBytes` bytes at `peekOffsetBytes`, valid until the next
   * call on this queue. Does not consume them.
   */
  peek(lengthBytes: number): Buffer {
    assert(lengthBytes > 0 && lengthBytes <= scratchBytes, "peek is for headers");
    assert(lengthBytes <= this.lengthBytesInternal, "peek past the queued bytes");
    const head = this.chunks[this.headIndex]!;
    if (head.byteLength - this.headOffsetBytes >= lengthBytes) {
      this.peekOffsetBytes = this.headOffsetBytes;
      return head;
    }
    this.copyOut(this.scratch, 0, lengthBytes, false);
    this.peekOffsetBytes = 0;
    return this.scratch;
  }

  /** The next `lengthBytes` bytes, consumed: a view of a chunk when possible, else a fresh copy. */
  take(lengthBytes: number): Buffer {
    assert(lengthBytes >= 0 && lengthBytes <= this.lengthBytesInternal, "take past the queued bytes");
    if (lengthBytes === 0) return Buffer.alloc(0);
    const head = this.chunks[this.headIndex]!;
    if (this.lendsViews && head.byteLength - this.headOffsetBytes >= lengthBytes) {
      const view = head.subarray(this.headOffsetBytes, this.headOffsetBytes + lengthBytes);
      this.skip(lengthBytes);
      return view;
    }
    const target = Buffer.allocUnsafe(lengthBytes);
    this.copyOut(target, 0, lengthBytes, true);
    return target;
  }

  /** The next `lengthBytes` bytes as a view of one chunk, consumed; undefined (nothing consumed) otherwise. */
  takeIfContiguous(lengthBytes: number): Buffer | undefined {
    assert(lengthBytes > 0, "a contiguous take of nothing");
    assert(this.lendsViews, "a queue over a reused buffer lends no views");
    if (lengthBytes > this.lengthBytesInternal) return undefined;
    const head = this.chunks[this.headIndex]!;
    if (head.byteLength - this.headOffsetBytes < lengthBytes) return undefined;
    const view = head.subarray(this.headOffsetBytes, this.headOffsetBytes + lengthBytes);
    this.skip(lengthBytes);
    return view;
  }

  /** Moves up to `lengthBytes` queued bytes into target at targetOffsetBytes; returns the count moved. */
  takeInto(target: Uint8Array, targetOffsetBytes: number, lengthBytes: number): number {
    const movedBytes = Math.min(lengthBytes, this.lengthBytesInternal);
    if (movedBytes > 0) this.copyOut(target, targetOffsetBytes, movedBytes, true);
    return movedBytes;
  }

  /** Discards up to `lengthBytes` queued bytes; returns the count discarded. */
  skip(lengthBytes: number): number {
    let leftBytes = Math.min(lengthBytes, this.lengthBytesInternal);
    const skippedBytes = leftBytes;
    while (leftBytes > 0) {
      const head = this.chunks[this.headIndex]!;
      const availableBytes = head.byteLength - this.headOffsetBytes;
      if (availableBytes > leftBytes) {
        this.headOffsetBytes += leftBytes;
        break;
      }
      leftBytes -= availableBytes;
      this.dropHead();
    }
    this.lengthBytesInternal -= skippedBytes;
    return skippedBytes;
  }

  /** Copies the queued bytes into memory of the queue's own, so that the chunks they came from may be reused. */
  ownBytes(): void {
    const lengthBytes = this.lengthBytesInternal;
    if (lengthBytes === 0) return;
    const owned = Buffer.allocUnsafe(lengthBytes);
    this.copyOut(owned, 0, lengthBytes, false);
    this.clear();
    this.push(owned);
  }

  /** Forgets everything queued (connection is going away). */
  clear(): void {
    this.chunks = [];
    this.headIndex = 0;
    this.headOffsetBytes = 0;
    this.lengthBytesInternal = 0;
  }

  private copyOut(target: Uint8Array, targetOffsetBytes: number, lengthBytes: number, consume: boolean) {
    let copiedBytes = 0;
    let index = this.headIndex;
    let offsetBytes = this.headOffsetBytes;
    while (copiedBytes < lengthBytes) {
      const chunk = this.chunks[index]!;
      const stepBytes = Math.min(chunk.byteLength - offsetBytes, lengthBytes - copiedBytes);
      copyBytes(
        target,
        targetOffsetBytes + copiedBytes,
        chunk.subarray(offsetBytes, offsetBytes + stepBytes),
      );
      copiedBytes += stepBytes;
      offsetBytes += stepBytes;
      if (offsetBytes === chunk.byteLength) {
        index += 1;
        offsetBytes = 0;
      }
    }
    if (consume) this.skip(lengthBytes);
  }

  private dropHead(): void {
    this.headIndex += 1;
    this.headOffsetBytes = 0;
    // Compact now and then so the array does not grow without bound on a long-lived connection.
    if (this.headIndex === this.chunks.length) {
      this.chunks.length = 0;
      this.headIndex = 0;
    } else if (this.headIndex >= 1024) {
      this.chunks = this.chunks.slice(this.headIndex);
      this.headIndex = 0;
    }
  }
}
