/**
 * CountingDevice: a stage that counts every request passing it into an IoStats (requests, bytes, errors,
 * latency) and otherwise changes nothing. The engine puts one under the checked wrapper of each export,
 * so it sees only valid requests, from every face alike.
 *
 * Cost per request: two performance.now() calls and a few array additions; no object is made for the
 * counting itself (the async frame is the one promise every stage returns anyway). No locks.
 *
 * Not counted here: extents queries (they move no data), and READs the FUSE reader thread serves
 * straight from an origin's file (BlockDevice.directReadFd): they never reach the device.
 */
import type { BlockDevice, WriteFlags, ZeroFlags } from "../block/device.js";
import { PassThroughDevice } from "../block/pass-through-device.js";
import { type IoStats, ioOpIndex } from "./io-stats.js";

export class CountingDevice extends PassThroughDevice {
  readonly stats: IoStats;

  constructor(inner: BlockDevice, stats: IoStats) {
    super(inner);
    this.stats = stats;
  }

  override async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    const startMs = performance.now();
    let failed = true;
    try {
      await this.inner.read(offsetBytes, target);
      failed = false;
    } finally {
      this.stats.record(ioOpIndex.read, target.byteLength, (performance.now() - startMs) / 1000, failed);
    }
  }

  override async write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    const startMs = performance.now();
    let failed = true;
    try {
      await this.inner.write(offsetBytes, source, flags);
      failed = false;
    } finally {
      this.stats.record(ioOpIndex.write, source.byteLength, (performance.now() - startMs) / 1000, failed);
    }
  }

  override async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    const startMs = performance.now();
    let failed = true;
    try {
      await this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
      failed = false;
    } finally {
      this.stats.record(ioOpIndex.zero, lengthBytes, (performance.now() - startMs) / 1000, failed);
    }
  }

  override async trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void> {
    const startMs = performance.now();
    let failed = true;
    try {
      await this.inner.trim(offsetBytes, lengthBytes, flags);
      failed = false;
    } finally {
      this.stats.record(ioOpIndex.trim, lengthBytes, (performance.now() - startMs) / 1000, failed);
    }
  }

  override async flush(): Promise<void> {
    const startMs = performance.now();
    let failed = true;
    try {
      await this.inner.flush();
      failed = false;
    } finally {
      this.stats.record(ioOpIndex.flush, 0, (performance.now() - startMs) / 1000, failed);
    }
  }
}
