/**
 * Tracker: the stage on every origin device (blksnap's tracker + filter). Every modification — write,
 * writeZeroes, trim — first marks the CBT write map, then, while a snapshot is taken, preserves the chunks
 * it overlaps (DiffArea.preserveForOriginWrite), then goes to the backend. Discard and write-zeroes are
 * writes here (blksnap issue #112 is the bug this avoids). Reads, flush and extents pass through.
 *
 * CBT is marked before the write and even when the write then fails (conservative, like QEMU), and a CBT
 * failure never skips copy-before-write (blksnap quirk 12, docs/design/semantics.md).
 *
 * The write gate makes take atomic across devices: `hold()` stops admitting new modifications and resolves
 * once the ones in flight have drained; the snapshot then switches CBT and attaches its DiffArea to every
 * member, and `release()` lets the held writes go — they see the new snapshot. Reads are never held.
 *
 * With a write intent (src/persist/region-journal.ts), each modification also tells it which regions it is
 * about to touch, right after the CBT mark and in the same synchronous step, and waits — only when a
 * region is touched for the first time since the last checkpoint — until that is durable.
 */
import type { BlockDevice, WriteFlags, ZeroFlags } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import { PassThroughDevice } from "../block/pass-through-device.js";
import type { WriteIntent } from "../block/write-intent.js";
import type { CbtMap } from "../cbt/cbt-map.js";
import { assert } from "../util/assert.js";
import type { DiffArea } from "./diff-area.js";

export class Tracker extends PassThroughDevice {
  readonly name: string;
  readonly backend: BlockDevice;
  readonly cbt: CbtMap;
  private diffArea: DiffArea | null = null;
  private inflightWrites = 0;
  private held: Promise<void> | null = null;
  private releaseHeld: (() => void) | null = null;
  private drainWaiter: (() => void) | null = null;
  /** Count of CBT marks that failed (a map corrupted by an out-of-range mark). */
  cbtErrorCount = 0;

  readonly writeIntent: WriteIntent | null;

  constructor(name: string, backend: BlockDevice, cbt: CbtMap, writeIntent: WriteIntent | null = null) {
    super(backend);
    this.writeIntent = writeIntent;
    this.name = name;
    this.backend = backend;
    this.cbt = cbt;
  }

  get attachedDiffArea(): DiffArea | null {
    return this.diffArea;
  }

  get isHeld(): boolean {
    return this.held !== null;
  }

  get inflightWriteCount(): number {
    return this.inflightWrites;
  }

  // read, flush, extents and directReadFd pass through (PassThroughDevice): origin reads need nothing from
  // the tracker and may even bypass it (BlockDevice.directReadFd).

  override write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    return this.modify(offsetBytes, source.byteLength, () => this.backend.write(offsetBytes, source, flags));
  }

  override writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    return this.modify(offsetBytes, lengthBytes, () =>
      this.backend.writeZeroes(offsetBytes, lengthBytes, flags),
    );
  }

  override trim(offsetBytes: number, lengthBytes: number, flags?: WriteFlags): Promise<void> {
    return this.modify(offsetBytes, lengthBytes, () => this.backend.trim(offsetBytes, lengthBytes, flags));
  }

  /**
   * Every modification: through the write gate, CBT mark, copy-before-write, then the backend. Written
   * without an async frame: a write that has nothing to wait for (no hold, no journal round, every chunk
   * already preserved or no snapshot) goes to the backend in the same synchronous step and costs one
   * promise reaction more than the backend's own, which is what makes a re-touch as cheap as a write
   * with no snapshot.
   */
  private modify(
    offsetBytes: number,
    lengthBytes: number,
    modifyBackend: () => Promise<void>,
  ): Promise<void> {
    if (this.held) {
      return this.waitForRelease().then(() => this.modify(offsetBytes, lengthBytes, modifyBackend));
    }
    this.inflightWrites++;
    let modified: Promise<void>;
    try {
      const before = this.beforeModify(offsetBytes, lengthBytes);
      modified = before === undefined ? modifyBackend() : before.then(modifyBackend);
    } catch (error) {
      modified = Promise.reject(error);
    }
    return modified.then(this.modifySucceeded, this.modifyFailed);
  }

  private readonly modifySucceeded = (): void => this.afterModify();

  private readonly modifyFailed = (error: unknown): never => {
    this.afterModify();
    throw error;
  };

  /** Stops admitting modifications and resolves when those in flight have finished. */
  async hold(): Promise<void> {
    assert(this.held === null, `tracker ${this.name} is already held`);
    this.held = new Promise((resolve) => {
      this.releaseHeld = resolve;
    });
    if (this.inflightWrites > 0) {
      await new Promise<void>((resolve) => {
        this.drainWaiter = resolve;
      });
    }
    assert(this.inflightWrites === 0, "writes drained");
  }

  release(): void {
    assert(this.held !== null && this.releaseHeld !== null, `tracker ${this.name} is not held`);
    const releaseHeld = this.releaseHeld;
    this.held = null;
    this.releaseHeld = null;
    releaseHeld();
  }

  /** Attaches (take) or detaches (destroy) a snapshot's diff area; only while held. */
  setDiffArea(diffArea: DiffArea | null): void {
    assert(this.held !== null, "the diff area changes only while writes are held");
    assert(diffArea === null || this.diffArea === null, `tracker ${this.name} already belongs to a snapshot`);
    this.diffArea = diffArea;
  }

  private async waitForRelease(): Promise<void> {
    // A bounded loop: a release is followed by at most one new hold per take or destroy.
    while (this.held) await this.held;
  }

  /** The CBT mark, the journal's intent and copy-before-write; undefined when there is nothing to wait for. */
  private beforeModify(offsetBytes: number, lengthBytes: number): Promise<void> | undefined {
    try {
      this.cbt.set(offsetBytes, lengthBytes);
    } catch (error) {
      // An out-of-range mark flags the map corrupted (reset at the next take) and must not stop the write;
      // anything else, a broken invariant above all, is not ours to swallow.
      if (!(error instanceof BlockError)) throw error;
      this.cbtErrorCount++;
    }
    const intent = this.writeIntent?.beforeWrite(offsetBytes, lengthBytes) ?? null;
    const diffArea = this.diffArea;
    if (intent === null) return diffArea?.preserveForOriginWrite(offsetBytes, lengthBytes);
    return intent.then(() => diffArea?.preserveForOriginWrite(offsetBytes, lengthBytes));
  }

  private afterModify(): void {
    this.inflightWrites--;
    assert(this.inflightWrites >= 0);
    if (this.inflightWrites === 0 && this.drainWaiter) {
      const drainWaiter = this.drainWaiter;
      this.drainWaiter = null;
      drainWaiter();
    }
  }
}
