/**
 * CbtMap: blksnap's change-block tracking (docs/design/semantics.md), one byte per tracking block.
 *
 * - writeMap is live: an origin write raises each touched block to `snapNumberActive`.
 * - readMap is frozen at take: it is what `cbt read` returns; later origin writes never change it.
 * - set_both (image writes, mark-dirty) raises writeMap to active AND readMap to previous, so the block is
 *   reported changed in the current map and again by the next snapshot.
 * - switchAtTake: readMap := writeMap, previous := active, active++.
 * - The wrap: active numbers are 1..255, so the take that would need active 256 starts a new generation.
 *   blksnap then reports changes_number 255 under the new generation id, and a backup tool that saves
 *   {generation, 255} and later copies blocks "> 255" misses every write made after the wrap. We treat the
 *   wrap like blksnap's reset-at-take instead: new generation, both maps zeroed, then the switch, so that
 *   take reports changes_number 1 (a full backup is due anyway: the generation changed) and the next one 2.
 * - reset: zero maps, previous 0, active 1, new generation. Done at take when the map was corrupted by an
 *   out-of-range set (a device that grew) or the device size changed.
 *
 * Memory: exactly two bytes per block. No locks: JavaScript is single-threaded and every operation is
 * synchronous.
 *
 * Every generation carries why it started (`generationReason`) and when, so a backup tool can explain a
 * forced full backup. exportState()/fromState() carry the whole map across a clean daemon restart
 * (cbt-state-codec.ts encodes it); a state that does not fit the device starts a new generation instead.
 */
import { randomUUID } from "node:crypto";
import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { cbtGeometry } from "./cbt-geometry.js";

export const snapNumberMax = 255;
/** Default bound on the runs of one changedRuns() answer (the NBD face's extents per reply). */
const changedRunsMaxDefault = 64 * 1024;

export interface CbtInfo {
  readonly blockSizeBytes: number;
  readonly deviceSizeBytes: number;
  readonly blockCount: number;
  readonly generationId: string;
  /** blksnap's changes_number: the number of the last take in this generation (0 before the first). */
  readonly changesNumber: number;
  /**
   * Why this generation started: `attached` (a new device), `restored` (kept across a clean restart),
   * `wrap` (255 takes), `reset` (the device size changed or the map was corrupted), or `untrusted: <why>`
   * (the saved state of a restarted daemon could not be trusted).
   */
  readonly generationReason: string;
  /** When this generation started (ISO 8601, UTC). */
  readonly generationStartedAt: string;
}

/** Everything a CbtMap is, for saving across a restart. */
export interface CbtState {
  readonly generationId: string;
  readonly generationReason: string;
  readonly generationStartedAtMs: number;
  readonly blockSizeBytes: number;
  readonly deviceSizeBytes: number;
  readonly snapNumberActive: number;
  readonly snapNumberPrevious: number;
  readonly writeMap: Uint8Array;
  readonly readMap: Uint8Array;
}

export class CbtMap {
  readonly blockSizeBytes: number;
  private deviceSizeBytesAtCreate: number;
  private blockCountValue: number;
  private writeMap: Uint8Array;
  private readMap: Uint8Array;
  private snapNumberActive = 1;
  private snapNumberPrevious = 0;
  private generation: string = randomUUID();
  private generationReasonValue: string;
  private generationStartedAtMs = Date.now();
  private corrupted = false;
  private readonly blockShift: number;

  constructor(deviceSizeBytes: number, blockSizeBytesOverride?: number, generationReason = "attached") {
    this.generationReasonValue = generationReason;
    const geometry = cbtGeometry(deviceSizeBytes, blockSizeBytesOverride);
    this.blockSizeBytes = geometry.blockSizeBytes;
    this.blockShift = Math.log2(geometry.blockSizeBytes);
    assert(Number.isInteger(this.blockShift));
    this.deviceSizeBytesAtCreate = deviceSizeBytes;
    this.blockCountValue = geometry.blockCount;
    this.writeMap = committedMap(geometry.blockCount);
    this.readMap = committedMap(geometry.blockCount);
  }

  get blockCount(): number {
    return this.blockCountValue;
  }

  get generationId(): string {
    return this.generation;
  }

  get generationReason(): string {
    return this.generationReasonValue;
  }

  /**
   * The map of a saved state, or — when the state does not fit the device as it is now (size or block
   * size changed) — a fresh generation saying why. Never trusts a state it cannot check.
   */
  static fromState(state: CbtState, deviceSizeBytes: number, blockSizeBytesOverride?: number): CbtMap {
    const map = new CbtMap(deviceSizeBytes, blockSizeBytesOverride, "restored");
    const why =
      state.deviceSizeBytes !== deviceSizeBytes
        ? `device size changed from ${state.deviceSizeBytes} to ${deviceSizeBytes} bytes`
        : state.blockSizeBytes !== map.blockSizeBytes
          ? `CBT block size changed from ${state.blockSizeBytes} to ${map.blockSizeBytes} bytes`
          : state.writeMap.length !== map.blockCount || state.readMap.length !== map.blockCount
            ? "saved maps do not match the block count"
            : !(
                  Number.isInteger(state.snapNumberActive) &&
                  state.snapNumberActive >= 1 &&
                  state.snapNumberActive <= snapNumberMax &&
                  state.snapNumberPrevious === state.snapNumberActive - 1
                )
              ? "saved snap numbers are inconsistent"
              : null;
    if (why !== null) {
      map.generationReasonValue = `untrusted: ${why}`;
      return map;
    }
    map.writeMap.set(state.writeMap);
    map.readMap.set(state.readMap);
    map.snapNumberActive = state.snapNumberActive;
    map.snapNumberPrevious = state.snapNumberPrevious;
    map.generation = state.generationId;
    map.generationStartedAtMs = state.generationStartedAtMs;
    return map;
  }

  /** A copy of the whole state (maps included), for saving. */
  /** The numbers a take changes, without the maps (the write intent's header). */
  exportNumbers(): {
    generationId: string;
    generationReason: string;
    generationStartedAtMs: number;
    snapNumberActive: number;
    snapNumberPrevious: number;
  } {
    return {
      generationId: this.generation,
      generationReason: this.generationReasonValue,
      generationStartedAtMs: this.generationStartedAtMs,
      snapNumberActive: this.snapNumberActive,
      snapNumberPrevious: this.snapNumberPrevious,
    };
  }

  exportState(): CbtState {
    return {
      generationId: this.generation,
      generationReason: this.generationReasonValue,
      generationStartedAtMs: this.generationStartedAtMs,
      blockSizeBytes: this.blockSizeBytes,
      deviceSizeBytes: this.deviceSizeBytesAtCreate,
      snapNumberActive: this.snapNumberActive,
      snapNumberPrevious: this.snapNumberPrevious,
      writeMap: this.writeMap.slice(),
      readMap: this.readMap.slice(),
    };
  }

  get changesNumber(): number {
    return this.snapNumberPrevious;
  }

  get activeNumber(): number {
    return this.snapNumberActive;
  }

  get isCorrupted(): boolean {
    return this.corrupted;
  }

  info(): CbtInfo {
    return {
      blockSizeBytes: this.blockSizeBytes,
      deviceSizeBytes: this.deviceSizeBytesAtCreate,
      blockCount: this.blockCountValue,
      generationId: this.generation,
      changesNumber: this.snapNumberPrevious,
      generationReason: this.generationReasonValue,
      generationStartedAt: new Date(this.generationStartedAtMs).toISOString(),
    };
  }

  /**
   * Blocks changed since the last take (those the next take will report as changed by it): the write
   * map's blocks at the active number. A scan of the map (one byte per block, at most 2 Mi), for metrics.
   */
  dirtyBlockCount(): number {
    const active = this.snapNumberActive;
    const writeMap = this.writeMap;
    let count = 0;
    for (let blockIndex = 0; blockIndex < writeMap.length; blockIndex++) {
      if (writeMap[blockIndex] === active) count++;
    }
    return count;
  }

  /** Marks an origin write. Throws EINVAL (and flags the map corrupted) for blocks beyond the map. */
  set(offsetBytes: number, lengthBytes: number): void {
    const [first, last] = this.blockSpan(offsetBytes, lengthBytes);
    const active = this.snapNumberActive;
    const writeMap = this.writeMap;
    for (let blockIndex = first; blockIndex <= last; blockIndex++) {
      if (writeMap[blockIndex]! < active) writeMap[blockIndex] = active;
    }
  }

  /** Marks a snapshot-image write or a mark-dirty range in both maps. */
  setBoth(offsetBytes: number, lengthBytes: number): void {
    const [first, last] = this.blockSpan(offsetBytes, lengthBytes);
    const active = this.snapNumberActive;
    const previous = this.snapNumberPrevious;
    for (let blockIndex = first; blockIndex <= last; blockIndex++) {
      if (this.writeMap[blockIndex]! < active) this.writeMap[blockIndex] = active;
      if (this.readMap[blockIndex]! < previous) this.readMap[blockIndex] = previous;
    }
  }

  /** The switch done at take, under the device's write hold. Resets first if needed. */
  switchAtTake(currentDeviceSizeBytes: number): void {
    const wraps = this.snapNumberActive === snapNumberMax;
    if (this.corrupted || wraps || currentDeviceSizeBytes !== this.deviceSizeBytesAtCreate) {
      this.reset(currentDeviceSizeBytes, wraps && !this.corrupted ? "wrap" : "reset");
    }
    this.readMap.set(this.writeMap);
    this.snapNumberPrevious = this.snapNumberActive;
    this.snapNumberActive++;
    assert(this.snapNumberActive >= 1 && this.snapNumberActive <= snapNumberMax);
    assert(this.snapNumberPrevious >= 1 && this.snapNumberPrevious <= snapNumberMax);
  }

  reset(deviceSizeBytes: number = this.deviceSizeBytesAtCreate, reason = "reset"): void {
    const geometry = cbtGeometry(deviceSizeBytes, this.blockSizeBytes);
    this.deviceSizeBytesAtCreate = deviceSizeBytes;
    this.blockCountValue = geometry.blockCount;
    this.writeMap = committedMap(geometry.blockCount);
    this.readMap = committedMap(geometry.blockCount);
    this.snapNumberActive = 1;
    this.snapNumberPrevious = 0;
    this.generation = randomUUID();
    this.generationReasonValue = reason;
    this.generationStartedAtMs = Date.now();
    this.corrupted = false;
  }

  /** A copy of the read map: one byte per block, the number of the epoch that last changed it. */
  readMapCopy(): Uint8Array {
    if (this.corrupted) throw new BlockError("EFAULT", "CBT map is corrupted until the next take");
    return this.readMap.slice();
  }

  /**
   * Runs over [offsetBytes, offsetBytes + lengthBytes), clipped to the device size, of blocks "changed in
   * the last epoch": readMap[i] >= changesNumber (written since the previous take of this generation, or
   * raised by setBoth). Before the first take nothing is changed. See changedRunsSince.
   */
  changedRuns(
    offsetBytes: number,
    lengthBytes: number,
    runsMax: number = changedRunsMaxDefault,
  ): Array<{ lengthBytes: number; changed: boolean }> {
    const since = this.snapNumberPrevious - 1;
    if (since < 0) return this.runsWhere(offsetBytes, lengthBytes, runsMax, () => false);
    return this.changedRunsSince(since, offsetBytes, lengthBytes, runsMax);
  }

  /**
   * Runs of blocks changed after take `sinceChangesNumber` of this generation (0 = since the generation
   * began): readMap[i] > sinceChangesNumber, which must be below changesNumber. Reads the map in place (no
   * copy). At most `runsMax` runs: the answer may then cover less than asked (what NBD's BLOCK_STATUS
   * allows).
   */
  changedRunsSince(
    sinceChangesNumber: number,
    offsetBytes: number,
    lengthBytes: number,
    runsMax: number = changedRunsMaxDefault,
  ): Array<{ lengthBytes: number; changed: boolean }> {
    assert(
      Number.isSafeInteger(sinceChangesNumber) &&
        sinceChangesNumber >= 0 &&
        sinceChangesNumber < this.snapNumberPrevious,
      "changes can be asked only since a take before the last one",
    );
    const readMap = this.readMap;
    return this.runsWhere(
      offsetBytes,
      lengthBytes,
      runsMax,
      (blockIndex) => readMap[blockIndex]! > sinceChangesNumber,
    );
  }

  private runsWhere(
    offsetBytes: number,
    lengthBytes: number,
    runsMax: number,
    isChanged: (blockIndex: number) => boolean,
  ): Array<{ lengthBytes: number; changed: boolean }> {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, "CBT offset must be a safe integer");
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 0, "CBT length must be a safe integer");
    assert(Number.isSafeInteger(runsMax) && runsMax > 0, "runsMax must be positive");
    if (this.corrupted) throw new BlockError("EFAULT", "CBT map is corrupted until the next take");
    const endBytes = Math.min(offsetBytes + lengthBytes, this.deviceSizeBytesAtCreate);
    const runs: Array<{ lengthBytes: number; changed: boolean }> = [];
    let positionBytes = offsetBytes;
    while (positionBytes < endBytes) {
      const blockIndex = Math.floor(positionBytes / this.blockSizeBytes);
      const changed = isChanged(blockIndex);
      const blockEndBytes = Math.min(endBytes, (blockIndex + 1) * this.blockSizeBytes);
      const last = runs[runs.length - 1];
      if (last && last.changed === changed) {
        last.lengthBytes += blockEndBytes - positionBytes;
      } else {
        if (runs.length >= runsMax) break;
        runs.push({ lengthBytes: blockEndBytes - positionBytes, changed });
      }
      positionBytes = blockEndBytes;
    }
    return runs;
  }

  /** A copy of the live write map (tests and diagnostics). */
  writeMapCopy(): Uint8Array {
    return this.writeMap.slice();
  }

  private blockSpan(offsetBytes: number, lengthBytes: number): [number, number] {
    assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, "CBT offset must be a safe integer");
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0, "CBT length must be positive");
    if (this.corrupted) throw new BlockError("EINVAL", "CBT map is corrupted");
    const first = Math.floor(offsetBytes / this.blockSizeBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.blockSizeBytes);
    if (last >= this.blockCountValue) {
      this.corrupted = true;
      throw new BlockError("EINVAL", `CBT block ${last} is beyond the map of ${this.blockCountValue} blocks`);
    }
    return [first, last];
  }
}

/**
 * A zeroed map whose pages are already committed: a fresh map is lazily backed by the kernel, and its
 * first full copy at take would otherwise pay the page faults inside the write hold (tens of ms per TiB).
 */
function committedMap(blockCount: number): Uint8Array {
  const map = new Uint8Array(blockCount);
  map.fill(1);
  map.fill(0);
  return map;
}
