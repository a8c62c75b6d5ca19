/**
 * PassThroughDevice: the base of a stage (nbdkit's filter shape). Every operation goes to the wrapped
 * device unchanged; a stage extends it and overrides only what it changes, so a new BlockDevice method
 * reaches every stage's inner device without each stage forwarding it by hand. Size and capabilities are
 * the inner device's (a stage that narrows them overrides the fields). No state, no locks.
 */
import type { BlockDevice, Capabilities, Extent, WriteFlags, ZeroFlags } from "./device.js";

export class PassThroughDevice implements BlockDevice {
  readonly inner: BlockDevice;
  readonly sizeBytes: number;
  readonly capabilities: Capabilities;

  constructor(inner: BlockDevice) {
    this.inner = inner;
    this.sizeBytes = inner.sizeBytes;
    this.capabilities = inner.capabilities;
  }

  read(offsetBytes: number, target: Uint8Array): Promise<void> {
    return this.inner.read(offsetBytes, target);
  }

  write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    return this.inner.write(offsetBytes, source, flags);
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    return this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
  }

  trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void> {
    return this.inner.trim(offsetBytes, lengthBytes, flags);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    if (!this.inner.extents) {
      return Promise.resolve([
        { lengthBytes: Math.min(lengthBytes, this.sizeBytes - offsetBytes), isHole: false, isZero: false },
      ]);
    }
    return this.inner.extents(offsetBytes, lengthBytes);
  }

  directReadFd(): number | null {
    return this.inner.directReadFd?.() ?? null;
  }
}
