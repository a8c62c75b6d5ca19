/**
 * The chunk log of a kept snapshot: an append-only file of 32-byte records, one per chunk stored in its
 * difference storage, written after the chunk's data and before the origin write that chunk protects goes
 * on (DiffArea.onStored). After a kill -9 the page cache still holds every record whose write returned, so
 * the chunk map is rebuilt exactly; after a host crash records may be missing, so the log also says which
 * boot wrote it and whether a clean stop sealed it (everything durable), and the keeper trusts an
 * unsealed log of another boot for nothing.
 *
 * Record: magic u32 | kind u16 | member u16 | a f64 | b f64 | reserved u32 | checksum of the 28 bytes before
 * (an FNV-style hash of the seven words, computed in JS: a native CRC-32 call per record made decoding 1 M
 * records take seconds).
 *   header (kind 0): a = format version;   stored (1): member, a = chunk index, b = location code;
 *   seal (2): a = time in ms;                boot (3): a, b = the boot id's first 24 hex digits.
 * Decoding checks every slot and keeps the valid ones: a torn or never-written slot (zeroes) is skipped,
 * never trusted, and never hides the records after it.
 */
import { BlockError } from "../block/errors.js";
import type { PersistFile } from "./persist-file.js";

export const chunkRecordBytes = 32;
const magic = 0x4b484342;
const formatVersion = 1;
const KIND_HEADER = 0;
const KIND_STORED = 1;
const KIND_SEAL = 2;
const KIND_BOOT = 3;

export interface DecodedChunkLog {
  /** Per member index: chunk index → location code (the first record of a chunk wins). */
  readonly chunks: Map<number, Map<number, number>>;
  /** Whether the last boot or stored record is followed by a seal (a clean stop). */
  readonly sealed: boolean;
  /** The boot id prefix of the last process that appended, or null. */
  readonly lastBoot: string | null;
  /** Slots that held no valid record (torn, unwritten or damaged). */
  readonly invalidSlots: number;
  /** Where the next record goes. */
  readonly endBytes: number;
}

/** Checksum of the first 28 bytes (seven little-endian words) of the record at `offsetBytes`. */
function recordChecksum(view: DataView, offsetBytes: number): number {
  let hash = 0x811c9dc5;
  for (let word = 0; word < 7; word++) {
    hash = Math.imul(hash ^ view.getUint32(offsetBytes + word * 4, true), 0x01000193);
    hash ^= hash >>> 15;
  }
  return hash >>> 0;
}

function encode(kind: number, member: number, a: number, b: number): Uint8Array {
  const record = new Uint8Array(chunkRecordBytes);
  const view = new DataView(record.buffer);
  view.setUint32(0, magic, true);
  view.setUint16(4, kind, true);
  view.setUint16(6, member, true);
  view.setFloat64(8, a, true);
  view.setFloat64(16, b, true);
  view.setUint32(28, recordChecksum(view, 0), true);
  return record;
}

/** The boot id as two numbers of 12 hex digits each (exact in a double). */
function bootNumbers(bootId: string): [number, number] {
  const hex = bootId.replace(/[^0-9a-f]/gi, "").padEnd(24, "0");
  return [Number.parseInt(hex.slice(0, 12), 16), Number.parseInt(hex.slice(12, 24), 16)];
}

function bootPrefix(a: number, b: number): string {
  return a.toString(16).padStart(12, "0") + b.toString(16).padStart(12, "0");
}

export function bootIdPrefix(bootId: string): string {
  const [a, b] = bootNumbers(bootId);
  return bootPrefix(a, b);
}

export function decodeChunkLog(bytes: Uint8Array): DecodedChunkLog {
  const chunks = new Map<number, Map<number, number>>();
  let sealed = false;
  let lastBoot: string | null = null;
  let invalidSlots = 0;
  let sawHeader = false;
  const slots = Math.floor(bytes.byteLength / chunkRecordBytes);
  const view = new DataView(bytes.buffer, bytes.byteOffset, slots * chunkRecordBytes);
  for (let slot = 0; slot < slots; slot++) {
    const at = slot * chunkRecordBytes;
    if (view.getUint32(at, true) !== magic || view.getUint32(at + 28, true) !== recordChecksum(view, at)) {
      invalidSlots++;
      continue;
    }
    const kind = view.getUint16(at + 4, true);
    const member = view.getUint16(at + 6, true);
    const a = view.getFloat64(at + 8, true);
    const b = view.getFloat64(at + 16, true);
    if (kind === KIND_HEADER) {
      if (a !== formatVersion) throw new BlockError("EINVAL", `chunk log format ${a} is not supported`);
      sawHeader = true;
    } else if (kind === KIND_STORED) {
      if (!Number.isSafeInteger(a) || a < 0 || !Number.isSafeInteger(b) || b < 0) {
        invalidSlots++;
        continue;
      }
      let map = chunks.get(member);
      if (!map) {
        map = new Map();
        chunks.set(member, map);
      }
      if (!map.has(a)) map.set(a, b);
      sealed = false;
    } else if (kind === KIND_SEAL) {
      sealed = true;
    } else if (kind === KIND_BOOT) {
      lastBoot = bootPrefix(a, b);
      sealed = false;
    } else {
      invalidSlots++;
    }
  }
  if (slots > 0 && !sawHeader) throw new BlockError("EINVAL", "not a chunk log (no valid header)");
  return { chunks, sealed, lastBoot, invalidSlots, endBytes: slots * chunkRecordBytes };
}

/**
 * Appends to a chunk log. Positions are reserved in call order, so records may be written concurrently.
 * Order between records does not matter: a chunk's origin write waits for that chunk's own record, so a
 * record lost to a kill -9 belongs to a chunk whose origin was not overwritten yet (its region is free
 * again, and the image reads the origin, still right).
 */
export class ChunkLogWriter {
  private readonly file: PersistFile;
  private nextBytes: number;

  private constructor(file: PersistFile, nextBytes: number) {
    this.file = file;
    this.nextBytes = nextBytes;
  }

  /** A new log (header) or one to go on with after `endBytes`; a boot record says who appends now. */
  static async open(file: PersistFile, endBytes: number, bootId: string): Promise<ChunkLogWriter> {
    const writer = new ChunkLogWriter(file, endBytes);
    if (endBytes === 0) await writer.append(encode(KIND_HEADER, 0, formatVersion, 0));
    const [a, b] = bootNumbers(bootId);
    await writer.append(encode(KIND_BOOT, 0, a, b));
    return writer;
  }

  stored(memberIndex: number, chunkIndex: number, locationCode: number): Promise<void> {
    return this.append(encode(KIND_STORED, memberIndex, chunkIndex, locationCode));
  }

  /** A clean stop: the storage was flushed before; the seal and everything before it made durable. */
  async seal(): Promise<void> {
    await this.file.sync();
    await this.append(encode(KIND_SEAL, 0, Date.now(), 0));
    await this.file.sync();
  }

  close(): Promise<void> {
    return this.file.close();
  }

  private append(record: Uint8Array): Promise<void> {
    const positionBytes = this.nextBytes;
    this.nextBytes += chunkRecordBytes;
    return this.file.write(positionBytes, record);
  }
}
