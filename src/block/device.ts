/**
 * The one interface that joins every layer: backends implement it, stages wrap it, faces (NBD, FUSE) serve
 * it. Offsets and lengths are bytes and always JavaScript numbers: devices are bounded by
 * Number.MAX_SAFE_INTEGER, and the faces check wire values (u64) in BigInt before they reach this interface.
 *
 * Contract (asserted once, by CheckedDevice, not in every stage): ranges lie inside [0, sizeBytes), lengths
 * are > 0, an operation is only called when its capability is advertised. Failures are BlockErrors.
 */

export interface Capabilities {
  readonly canWrite: boolean;
  readonly canFlush: boolean;
  readonly canFua: boolean;
  readonly canTrim: boolean;
  readonly canZero: boolean;
  readonly canFastZero: boolean;
  readonly canExtents: boolean;
  /** Flush on one connection makes data visible and durable for all: true for one in-process state. */
  readonly canMultiConn: boolean;
}

export interface WriteFlags {
  /** Force unit access: the write is durable when the promise resolves. */
  readonly fua?: boolean;
}

export interface ZeroFlags {
  readonly fua?: boolean;
  /** The range must stay allocated (no hole may be punched). */
  readonly noHole?: boolean;
  /** Fail with ENOTSUP instead of falling back to a slow write of zeroes. */
  readonly fastZero?: boolean;
}

/** One run of blocks with the same allocation status, starting where the previous one ended. */
export interface Extent {
  readonly lengthBytes: number;
  /** Not allocated (NBD_STATE_HOLE). */
  readonly isHole: boolean;
  /** Reads as zeroes (NBD_STATE_ZERO). */
  readonly isZero: boolean;
}

export interface BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities;
  read(offsetBytes: number, target: Uint8Array): Promise<void>;
  write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void>;
  writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void>;
  flush(): Promise<void>;
  /** Allocation status of [offsetBytes, offsetBytes + lengthBytes); may cover less, never more than asked. */
  extents?(offsetBytes: number, lengthBytes: number): Promise<Extent[]>;
  /**
   * A file descriptor whose bytes at [0, sizeBytes) are this device's bytes for as long as the device is
   * open, readable (pread, from any thread) without this device's coordination: the file under an origin.
   * Absent or null where a read needs the device (snapshot images, memory). A face that serves reads with
   * it off the event loop opens its own description of it at once (/proc/self/fd/N) and never uses the
   * number itself later: the device may close it at any time.
   */
  directReadFd?(): number | null;
}
