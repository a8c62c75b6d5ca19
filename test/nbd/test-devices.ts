/**
 * Devices for the NBD tests: a capability override, a gate that holds reads until the test opens it (to
 * have requests in flight on purpose), and devices that fail like a destroyed snapshot (EIO) or like a bug
 * (a plain Error).
 */
import type { BlockDevice, Capabilities, Extent, ZeroFlags } from "../../src/block/device.js";
import { BlockError } from "../../src/block/errors.js";
import { PassThroughDevice } from "../../src/block/pass-through-device.js";

/** The stage base (PassThroughDevice) with an optional capability override; subclasses override the rest. */
export class ForwardingDevice extends PassThroughDevice {
  override readonly capabilities: Capabilities;

  constructor(inner: BlockDevice, capabilities: Partial<Capabilities> = {}) {
    super(inner);
    this.capabilities = { ...inner.capabilities, ...capabilities };
  }
}

/** Reads wait until open() is called; counts the reads that are waiting. */
export class GatedDevice extends ForwardingDevice {
  waitingReads = 0;
  private gate: Promise<void>;
  private release!: () => void;

  constructor(inner: BlockDevice) {
    super(inner);
    this.gate = new Promise((resolve) => {
      this.release = resolve;
    });
  }

  open(): void {
    this.release();
  }

  override async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    this.waitingReads += 1;
    await this.gate;
    this.waitingReads -= 1;
    return super.read(offsetBytes, target);
  }
}

/** Every data operation fails with EIO, as the image of a corrupted or destroyed snapshot does. */
export class FailingDevice extends ForwardingDevice {
  override async read(): Promise<void> {
    throw new BlockError("EIO", "snapshot destroyed");
  }
  override async write(): Promise<void> {
    throw new BlockError("EIO", "snapshot destroyed");
  }
  override async writeZeroes(): Promise<void> {
    throw new BlockError("EIO", "snapshot destroyed");
  }
  override async flush(): Promise<void> {
    throw new BlockError("EIO", "snapshot destroyed");
  }
  override async extents(): Promise<Extent[]> {
    throw new BlockError("EIO", "snapshot destroyed");
  }
}

/** Throws what a buggy stage would: plain Errors and a non-Error value. */
export class BuggyDevice extends ForwardingDevice {
  override async read(): Promise<void> {
    throw new TypeError("undefined is not a function (simulated bug)");
  }
  override async write(): Promise<void> {
    throw "a string, not an Error";
  }
  override writeZeroes(): Promise<void> {
    // Synchronous throw from a non-async method.
    throw new RangeError("simulated synchronous bug");
  }
}

/** WRITE_ZEROES with FAST_ZERO fails with ENOTSUP (a device that cannot zero quickly right now). */
export class SlowZeroDevice extends ForwardingDevice {
  override async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    if (flags?.fastZero) throw new BlockError("ENOTSUP", "zeroing would be slow");
    return super.writeZeroes(offsetBytes, lengthBytes, flags);
  }
}
