/**
 * FaultDevice: a stage that fails or delays chosen operations, for tests of what the layers above do with
 * I/O errors and slow devices (nbdkit's error and delay filters, QEMU's blkdebug, TigerBeetle's testing
 * storage). A fault rule names operations, an errno and/or a delay, and when it fires: with a probability drawn from a seeded generator (a failing run replays
 * from its seed), after the first `skipCount` matching calls, at most `count` times, and only for requests
 * that overlap [offsetBytes, offsetBytes + lengthBytes). The first rule that fires wins. A fired write may
 * be torn: part of the data reaches the device before the error (what a crash mid-write leaves).
 *
 * Faults are injected before the inner call (torn writes excepted), so a failed request changed nothing
 * below.
 * Reads never come back short: the BlockDevice contract has no short reads (a device fills the buffer or
 * fails). directReadFd is hidden so that no face reads around the faults. No locks; state is the counters.
 */
import type { BlockDevice, WriteFlags, ZeroFlags } from "./device.js";
import { BlockError, type Errno } from "./errors.js";
import { PassThroughDevice } from "./pass-through-device.js";

export type FaultOperation = "read" | "write" | "writeZeroes" | "trim" | "flush";

export interface FaultRule {
  readonly operations: readonly FaultOperation[];
  /** The error of a fired call; without one a fired call is only delayed. */
  readonly errno?: Errno;
  /** A fired call first waits this long. */
  readonly delayMs?: number;
  /** Chance that a matching call fails, 0..1; default 1. */
  readonly probability?: number;
  /** Matching calls let through before the rule may fire; default 0. */
  readonly skipCount?: number;
  /** How many times the rule fires at most; default unbounded. */
  readonly count?: number;
  /** Only requests overlapping this range match (flush always matches); default the whole device. */
  readonly offsetBytes?: number;
  readonly lengthBytes?: number;
  /** A fired write first writes this fraction of its data (rounded down to 512 bytes), 0..1; default 0. */
  readonly tornFraction?: number;
}

export interface FaultDeviceOptions {
  readonly rules: readonly FaultRule[];
  /** Seed of the generator behind `probability`; default 1. */
  readonly seed?: number;
}

interface RuleState {
  readonly rule: FaultRule;
  matched: number;
  fired: number;
}

export class FaultDevice extends PassThroughDevice {
  private readonly rules: RuleState[];
  private randomState: number;
  /** Faults injected so far, by operation (tests check that the faults really happened). */
  readonly firedCounts = new Map<FaultOperation, number>();
  /** While false the device passes everything through (e.g. during a test's setup). */
  enabled = true;

  constructor(inner: BlockDevice, options: FaultDeviceOptions) {
    super(inner);
    for (const rule of options.rules) {
      if ((rule.probability ?? 1) < 0 || (rule.probability ?? 1) > 1 || (rule.tornFraction ?? 0) < 0) {
        throw new BlockError("EINVAL", "a fault's probability and torn fraction lie in 0..1");
      }
      if (rule.errno === undefined && rule.delayMs === undefined) {
        throw new BlockError("EINVAL", "a fault rule needs an errno, a delay, or both");
      }
      if (rule.delayMs !== undefined && !(rule.delayMs >= 0 && rule.delayMs <= 60_000)) {
        throw new BlockError("EINVAL", "a fault's delay lies in 0..60000 ms");
      }
    }
    this.rules = options.rules.map((rule) => ({ rule, matched: 0, fired: 0 }));
    this.randomState = (options.seed ?? 1) >>> 0;
  }

  get firedTotal(): number {
    let total = 0;
    for (const count of this.firedCounts.values()) total += count;
    return total;
  }

  override async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    await this.failIfFired("read", offsetBytes, target.byteLength);
    return this.inner.read(offsetBytes, target);
  }

  override async write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    const fired = this.fire("write", offsetBytes, source.byteLength);
    if (fired?.delayMs !== undefined) await sleep(fired.delayMs);
    if (fired?.errno !== undefined) {
      const tornBytes = tornLength(fired, source.byteLength);
      if (tornBytes > 0) await this.inner.write(offsetBytes, source.subarray(0, tornBytes));
      throw faultError(fired, "write", offsetBytes);
    }
    return this.inner.write(offsetBytes, source, flags);
  }

  override async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    await this.failIfFired("writeZeroes", offsetBytes, lengthBytes);
    return this.inner.writeZeroes(offsetBytes, lengthBytes, flags);
  }

  override async trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void> {
    await this.failIfFired("trim", offsetBytes, lengthBytes);
    return this.inner.trim(offsetBytes, lengthBytes, flags);
  }

  override async flush(): Promise<void> {
    await this.failIfFired("flush", 0, 0);
    return this.inner.flush();
  }

  override directReadFd(): number | null {
    return null;
  }

  private async failIfFired(
    operation: FaultOperation,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<void> {
    const fired = this.fire(operation, offsetBytes, lengthBytes);
    if (fired?.delayMs !== undefined) await sleep(fired.delayMs);
    if (fired?.errno !== undefined) throw faultError(fired, operation, offsetBytes);
  }

  /** The rule that fires for this call, if any; counts it. */
  private fire(operation: FaultOperation, offsetBytes: number, lengthBytes: number): FaultRule | undefined {
    if (!this.enabled) return undefined;
    for (const state of this.rules) {
      const { rule } = state;
      if (!rule.operations.includes(operation)) continue;
      if (operation !== "flush" && !overlaps(rule, offsetBytes, lengthBytes)) continue;
      state.matched++;
      if (state.matched <= (rule.skipCount ?? 0)) continue;
      if (rule.count !== undefined && state.fired >= rule.count) continue;
      if (this.nextRandom() >= (rule.probability ?? 1)) continue;
      state.fired++;
      this.firedCounts.set(operation, (this.firedCounts.get(operation) ?? 0) + 1);
      return rule;
    }
    return undefined;
  }

  /** mulberry32: uniform in [0, 1). */
  private nextRandom(): number {
    this.randomState = (this.randomState + 0x6d2b79f5) >>> 0;
    let t = this.randomState;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }
}

function overlaps(rule: FaultRule, offsetBytes: number, lengthBytes: number): boolean {
  const ruleStart = rule.offsetBytes ?? 0;
  const ruleEnd = rule.lengthBytes === undefined ? Number.POSITIVE_INFINITY : ruleStart + rule.lengthBytes;
  return offsetBytes < ruleEnd && ruleStart < offsetBytes + Math.max(lengthBytes, 1);
}

function tornLength(rule: FaultRule, lengthBytes: number): number {
  const fraction = Math.min(1, rule.tornFraction ?? 0);
  return Math.floor((lengthBytes * fraction) / 512) * 512;
}

function faultError(rule: FaultRule, operation: FaultOperation, offsetBytes: number): BlockError {
  const errno = rule.errno ?? "EIO";
  return new BlockError(errno, `injected ${errno} on ${operation} at ${offsetBytes}`);
}

function sleep(delayMs: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, delayMs));
}
