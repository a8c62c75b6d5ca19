/**
 * CheckedDevice: the single place where requests are validated before they enter a stack of stages
 * (nbdkit's backend.c, QEMU's bdrv_check_request). Faces wrap every device they serve in one; stages
 * below may then trust their input.
 *
 * Rules: lengths are positive safe integers; a range past the end fails with ENOSPC for writes and zeroes
 * (nothing was written) and EINVAL for reads, trims and extents; an operation whose capability is not
 * advertised fails with EPERM (writes on a read-only device) or ENOTSUP; a read-only view refuses every
 * modification with EPERM. It holds no locks and no state besides the wrapped device.
 */
import type { BlockDevice, Capabilities, Extent, WriteFlags, ZeroFlags } from "./device.js";
import { BlockError } from "./errors.js";

export interface CheckedDeviceOptions {
  /** Serve the device read-only even if it can write. */
  readonly readOnly?: boolean;
}

export class CheckedDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities;
  readonly inner: BlockDevice;

  constructor(inner: BlockDevice, options: CheckedDeviceOptions = {}) {
    this.inner = inner;
    this.sizeBytes = inner.sizeBytes;
    const caps = inner.capabilities;
    this.capabilities = options.readOnly
      ? { ...caps, canWrite: false, canTrim: false, canZero: false, canFastZero: false, canFua: false }
      : caps;
  }

  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    this.checkRange("read", offsetBytes, target.byteLength, "EINVAL");
    return this.inner.read(offsetBytes, target);
  }

  async write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.checkWritable("write");
    this.checkRange("write", offsetBytes, source.byteLength, "ENOSPC");
    if (flags?.fua && !this.capabilities.canFua)
      throw new BlockError("EINVAL", "write: FUA is not supported");
    return this.inner.write(offsetBytes, source, flags);
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    this.checkWritable("writeZeroes");
    if (!this.capabilities.canZero) throw new BlockError("ENOTSUP", "writeZeroes: not supported");
    if (flags?.fastZero && !this.capabilities.canFastZero) {
      throw new BlockError("ENOTSUP", "writeZeroes: fast zero is not supported");
    }
    this.checkRange("writeZeroes", offsetBytes, lengthBytes, "ENOSPC");
    return this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
  }

  async trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void> {
    this.checkWritable("trim");
    if (!this.capabilities.canTrim) throw new BlockError("ENOTSUP", "trim: not supported");
    this.checkRange("trim", offsetBytes, lengthBytes, "EINVAL");
    return this.inner.trim(offsetBytes, lengthBytes, flags);
  }

  async flush(): Promise<void> {
    if (!this.capabilities.canFlush) return Promise.resolve();
    return this.inner.flush();
  }

  directReadFd(): number | null {
    return this.inner.directReadFd?.() ?? null;
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    this.checkRange("extents", offsetBytes, lengthBytes, "EINVAL");
    const inner = this.inner;
    if (!inner.extents || !this.capabilities.canExtents) {
      return [{ lengthBytes, isHole: false, isZero: false }];
    }
    return inner.extents(offsetBytes, lengthBytes);
  }

  private checkWritable(operation: string): void {
    if (!this.capabilities.canWrite) throw new BlockError("EPERM", `${operation}: device is read-only`);
  }

  private checkRange(
    operation: string,
    offsetBytes: number,
    lengthBytes: number,
    pastEnd: "EINVAL" | "ENOSPC",
  ) {
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0) {
      throw new BlockError("EINVAL", `${operation}: invalid offset ${offsetBytes}`);
    }
    if (!Number.isSafeInteger(lengthBytes) || lengthBytes <= 0) {
      throw new BlockError("EINVAL", `${operation}: invalid length ${lengthBytes}`);
    }
    if (offsetBytes + lengthBytes > this.sizeBytes) {
      throw new BlockError(
        pastEnd,
        `${operation}: range ${offsetBytes}+${lengthBytes} ends past the device size ${this.sizeBytes}`,
      );
    }
  }
}
