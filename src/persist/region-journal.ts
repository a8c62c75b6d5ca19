/**
 * RegionJournal: the write-intent journal that lets CBT survive a crash (md's write-intent bitmap, Hyper-V's
 * modified-region table). The device is cut into regions of `regionBlocks` CBT blocks; a region's byte in
 * the journal file is made durable (write + fdatasync) before the first modification since the last
 * checkpoint of that region is issued to the backend. After a crash, recovery (cbt-recovery.ts) raises
 * every block of every dirty region: the map may over-report (at most the dirty regions), never miss.
 *
 * File: two header slots (0 and 4 KiB, written alternately with a rising sequence number and a SHA-256,
 * so a torn header write leaves the other slot), then one byte per region (0 clean, 1 dirty) at 8 KiB.
 * Single-byte writes cannot tear.
 *
 * Ordering: every file operation runs in one serial chain (rounds). Concurrent first touches share a round
 * and one fdatasync (group commit). A checkpoint clears, in a later round, only regions not touched since
 * the checkpoint's map was copied (touchEpoch); a region cleared while a write comes in is dirtied again
 * in the round after the clearing one, before that write is issued.
 *
 * If the journal cannot be written, it is broken: `onBroken` removes the file (so that recovery cannot
 * trust a journal that misses regions and starts a new generation instead) and writes go on unjournaled.
 * Single-threaded: all of it runs on the event loop.
 */
import { createHash } from "node:crypto";
import { BlockError } from "../block/errors.js";
import type { TakeNumbers, WriteIntent } from "../block/write-intent.js";
import { assert } from "../util/assert.js";
import type { PersistFile } from "./persist-file.js";

export interface JournalHeader extends TakeNumbers {
  readonly blockSizeBytes: number;
  readonly deviceSizeBytes: number;
  readonly regionBlocks: number;
  /** The backend's identity without its modification time (which a crash leaves newer than any record). */
  readonly backendIdentity: Readonly<Record<string, string>>;
  /** /proc/sys/kernel/random/boot_id of the daemon that wrote it: a changed one means a host crash. */
  readonly bootId: string;
  /** True only after a clean stop wrote the checkpoint that makes the map exact. */
  readonly clean: boolean;
  /**
   * The generation of the checkpoint that regions were cleared against: when it is this generation,
   * recovery needs that checkpoint (without it, cleared regions' changes would be lost).
   */
  readonly checkpointGenerationId: string | null;
}

export interface LoadedJournal {
  readonly header: JournalHeader;
  readonly sequence: number;
  /** One byte per region: 1 dirty. */
  readonly dirty: Uint8Array;
}

const slotBytes = 4096;
const bitmapAt = 2 * slotBytes;
const journalFormat = "blocksnap-cbt-journal";
const journalVersion = 1;
/** Default region: 1024 CBT blocks (64 MiB with 64 KiB blocks). */
export const regionBlocksDefault = 1024;

function encodeSlot(header: JournalHeader, sequence: number): Uint8Array {
  const json = JSON.stringify({ format: journalFormat, version: journalVersion, sequence, ...header });
  const digest = createHash("sha256").update(json).digest("hex");
  const text = Buffer.from(`${json}\n${digest}\n`, "utf8");
  assert(text.byteLength <= slotBytes, "journal header larger than its slot");
  const slot = new Uint8Array(slotBytes);
  slot.set(text);
  return slot;
}

function decodeSlot(bytes: Uint8Array): { header: JournalHeader; sequence: number } | null {
  const text = Buffer.from(bytes).toString("utf8").replace(/\0+$/, "");
  const [json, digest] = text.split("\n");
  if (json === undefined || digest === undefined) return null;
  if (createHash("sha256").update(json).digest("hex") !== digest) return null;
  const parsed = JSON.parse(json) as JournalHeader & { format?: string; version?: number; sequence?: number };
  if (parsed.format !== journalFormat || parsed.version !== journalVersion) return null;
  if (!Number.isSafeInteger(parsed.sequence)) return null;
  const { format: _format, version: _version, sequence, ...header } = parsed;
  return { header, sequence: sequence ?? 0 };
}

/** The highest sequence among the intact header slots of `bytes` (0 when there is none). */
function highestSequenceIn(bytes: Uint8Array): number {
  let highest = 0;
  for (const index of [0, 1]) {
    try {
      const slot = decodeSlot(bytes.subarray(index * slotBytes, (index + 1) * slotBytes));
      if (slot) highest = Math.max(highest, slot.sequence);
    } catch {
      // A damaged slot holds no sequence to go on from.
    }
  }
  return highest;
}

/** The journal a file holds, or an EINVAL BlockError saying why it cannot be used. */
export function decodeJournal(bytes: Uint8Array): LoadedJournal {
  const slots = [0, 1]
    .map((index) => decodeSlot(bytes.subarray(index * slotBytes, (index + 1) * slotBytes)))
    .filter((slot) => slot !== null);
  if (slots.length === 0) throw new BlockError("EINVAL", "CBT journal: no intact header");
  const newest = slots.reduce((a, b) => (b.sequence > a.sequence ? b : a));
  const { header } = newest;
  const regionCount = regionCountOf(header);
  if (bytes.byteLength < bitmapAt + regionCount)
    throw new BlockError("EINVAL", "CBT journal: region map cut short");
  const dirty = bytes.slice(bitmapAt, bitmapAt + regionCount);
  if (!dirty.every((value) => value === 0 || value === 1)) {
    throw new BlockError("EINVAL", "CBT journal: region map damaged");
  }
  return { header, sequence: newest.sequence, dirty };
}

export function regionCountOf(
  header: Pick<JournalHeader, "blockSizeBytes" | "deviceSizeBytes" | "regionBlocks">,
): number {
  const blockCount = Math.ceil(header.deviceSizeBytes / header.blockSizeBytes);
  return Math.max(1, Math.ceil(blockCount / header.regionBlocks));
}

export class RegionJournal implements WriteIntent {
  private readonly file: PersistFile;
  private readonly onBroken: (error: unknown) => void;
  private header: JournalHeader;
  private sequence: number;
  private readonly regionBytes: number;
  /** 1 where the journal file durably says dirty (and the region may be written freely). */
  private readonly durable: Uint8Array;
  /** The checkpoint epoch in which each region was last touched. */
  private readonly touchEpoch: Uint32Array;
  private epoch = 1;
  private readonly pending = new Set<number>();
  private readonly waiting = new Map<number, Promise<void>>();
  /** The tail of the serial chain of file operations. */
  private chain: Promise<void> = Promise.resolve();
  private nextRound: Promise<void> | null = null;
  private broken = false;
  private closed = false;

  private constructor(
    file: PersistFile,
    header: JournalHeader,
    sequence: number,
    dirty: Uint8Array,
    onBroken: (error: unknown) => void,
  ) {
    this.file = file;
    this.header = header;
    this.sequence = sequence;
    this.onBroken = onBroken;
    this.regionBytes = header.regionBlocks * header.blockSizeBytes;
    this.durable = dirty.slice();
    this.touchEpoch = new Uint32Array(dirty.length);
  }

  /**
   * Starts a journal in `file`: `previous` (a recovered one) keeps its dirty regions until a checkpoint
   * clears them; without it every region is clean. The header (clean: false) is durable when this resolves.
   */
  static async start(
    file: PersistFile,
    header: Omit<JournalHeader, "clean">,
    previous: LoadedJournal | null,
    onBroken: (error: unknown) => void,
  ): Promise<RegionJournal> {
    const regionCount = regionCountOf(header);
    const dirty =
      previous !== null && previous.dirty.length === regionCount
        ? previous.dirty
        : new Uint8Array(regionCount);
    // A new journal over an old file goes on above the old headers' sequence: otherwise the old slot (a
    // clean stop's, say) would stay the newest, and recovery after a crash would believe it.
    const startSequence = previous?.sequence ?? highestSequenceIn(await file.readAll());
    const journal = new RegionJournal(file, { ...header, clean: false }, startSequence, dirty, onBroken);
    await file.write(bitmapAt, dirty);
    await journal.writeHeader();
    return journal;
  }

  get regionSizeBytes(): number {
    return this.regionBytes;
  }

  get dirtyRegionCount(): number {
    let count = 0;
    for (const value of this.durable) count += value;
    return count + this.pending.size;
  }

  beforeWrite(offsetBytes: number, lengthBytes: number): Promise<void> | null {
    if (this.broken || this.closed || lengthBytes <= 0) return null;
    const first = Math.floor(offsetBytes / this.regionBytes);
    const last = Math.min(
      this.durable.length - 1,
      Math.floor((offsetBytes + lengthBytes - 1) / this.regionBytes),
    );
    let waits: Promise<void>[] | null = null;
    for (let region = first; region <= last; region++) {
      this.touchEpoch[region] = this.epoch;
      if (this.durable[region] === 1) continue;
      let promise = this.waiting.get(region);
      if (promise === undefined) {
        this.pending.add(region);
        promise = this.scheduleRound();
        this.waiting.set(region, promise);
      }
      waits ??= [];
      waits.push(promise);
    }
    if (waits === null) return null;
    return waits.length === 1 ? waits[0]! : Promise.all(waits).then(() => {});
  }

  afterTake(numbers: TakeNumbers): Promise<void> {
    return this.enqueue(async () => {
      // A new generation (wrap, reset) starts from empty maps: no checkpoint of it exists yet.
      const checkpointGenerationId =
        numbers.generationId === this.header.generationId ? this.header.checkpointGenerationId : null;
      this.header = { ...this.header, ...numbers, checkpointGenerationId };
      await this.writeHeader();
    });
  }

  /** Durably names the generation whose checkpoint recovery needs; before any region is cleared for it. */
  setCheckpointGeneration(generationId: string): Promise<void> {
    return this.enqueue(async () => {
      this.header = { ...this.header, checkpointGenerationId: generationId };
      await this.writeHeader();
    });
  }

  /** A checkpoint is about to copy the map: returns its token for checkpointDone. */
  checkpointBegin(): number {
    this.epoch++;
    return this.epoch;
  }

  /**
   * The map copied at checkpointBegin(token) is durable: regions not touched since are clean again.
   * `clean`: a clean stop (nothing can be written any more): the header says the map is exact.
   */
  checkpointDone(token: number, options: { readonly clean?: boolean } = {}): Promise<void> {
    return this.enqueue(async () => {
      const cleared: number[] = [];
      for (let region = 0; region < this.durable.length; region++) {
        if (this.durable[region] === 1 && this.touchEpoch[region]! < token && !this.pending.has(region)) {
          this.durable[region] = 0;
          cleared.push(region);
        }
      }
      for (const region of cleared) await this.file.write(bitmapAt + region, zeroByte);
      if (options.clean === true) {
        assert(this.pending.size === 0, "clean stop with writes pending");
        this.header = { ...this.header, clean: true };
        await this.file.sync();
        await this.writeHeader();
      } else if (cleared.length > 0) {
        await this.file.sync();
      }
    });
  }

  /** Waits for every file operation queued so far, then closes the file. */
  async close(): Promise<void> {
    this.closed = true;
    await this.chain.catch(() => {});
    await this.file.close();
  }

  private scheduleRound(): Promise<void> {
    this.nextRound ??= this.enqueue(async () => {
      this.nextRound = null;
      const regions = [...this.pending];
      this.pending.clear();
      for (const region of regions) await this.file.write(bitmapAt + region, oneByte);
      await this.file.sync();
      for (const region of regions) {
        this.durable[region] = 1;
        this.waiting.delete(region);
      }
    });
    return this.nextRound;
  }

  /** Runs `step` after everything queued before it; a failure breaks the journal (see the notes). */
  private enqueue(step: () => Promise<void>): Promise<void> {
    const run = this.chain.then(async () => {
      if (this.broken) return;
      try {
        await step();
      } catch (error) {
        this.broken = true;
        this.pending.clear();
        this.waiting.clear();
        this.onBroken(error);
      }
    });
    this.chain = run;
    return run;
  }

  private async writeHeader(): Promise<void> {
    this.sequence++;
    await this.file.write((this.sequence % 2) * slotBytes, encodeSlot(this.header, this.sequence));
    await this.file.sync();
  }
}

const oneByte = new Uint8Array([1]);
const zeroByte = new Uint8Array([0]);
