/**
 * ChunkCodec: turns plain bytes into a stored object and back (docs/backup-format.md, "Objects").
 *
 * encode: id = SHA-256 of the plain bytes (HMAC-SHA-256 with the id key when the repository is encrypted,
 * so names leak nothing about content), zstd (kept raw when it does not shrink), then AES-256-GCM with a
 * random 96-bit nonce and the header as associated data, then a CRC-32 of the stored payload.
 * decode: checks magic, version, CRC, tag, decompresses, and recomputes the id when one is expected, so a
 * wrong key, a flipped bit or a swapped file are each a distinct, named error.
 *
 * Pure and synchronous: it runs inside the codec worker threads (codec-pool.ts), never on the event loop
 * of the daemon except in tests. Bounded: a decoded object may not exceed `plainLengthMax`.
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, randomFillSync } from "node:crypto";
import { createRequire } from "node:module";
import { crc32 } from "node:zlib";
import { BlockError } from "../block/errors.js";

/**
 * zstd-napi's documented low-level binding: compress2/decompress into buffers the caller owns. Its simple
 * compress()/decompress() allocate a fresh multi-MiB result per call, and on this kind of VM the page
 * faults of a fresh 4 MiB buffer cost ~10 ms of CPU, more than zstd itself (BENCHMARKS.md, backup).
 */
const zstd = createRequire(import.meta.url)("zstd-napi/binding") as typeof import("zstd-napi/binding.js");

export const objectMagic = 0x4b4f5342; // "BSOK" little-endian
export const objectFormatVersion = 1;
export const objectHeaderBytes = 16;
const flagZstd = 1;
const flagAesGcm = 2;
const nonceBytes = 12;
const tagBytes = 16;
/** zstd level 1, as the Proxmox Backup Server client uses: the fastest level of the normal range. */
export const zstdLevel = 1;
/** AES-GCM runs in slices of this size, so its outputs are small heap allocations that malloc reuses. */
const cipherSliceBytes = 64 << 10;

/** The largest stored object for `plainBytes` of plain data: header, nonce, tag, zstd's worst case. */
export function storedBytesBound(plainBytes: number): number {
  return objectHeaderBytes + nonceBytes + tagBytes + Math.max(plainBytes, zstd.compressBound(plainBytes));
}

export interface CodecKeys {
  /** 32 bytes: HMAC key naming chunks. */
  readonly idKey: Uint8Array;
  /** 32 bytes: AES-256-GCM key. */
  readonly encryptionKey: Uint8Array;
}

export class ChunkCodec {
  private readonly keys: CodecKeys | null;
  private readonly plainLengthMax: number;
  private readonly cctx = new zstd.CCtx();
  private readonly dctx = new zstd.DCtx();

  constructor(keys: CodecKeys | null, plainLengthMax: number) {
    this.keys = keys;
    this.plainLengthMax = plainLengthMax;
    this.cctx.setParameter(zstd.CParameter.compressionLevel, zstdLevel);
  }

  get encrypted(): boolean {
    return this.keys !== null;
  }

  idOf(plain: Uint8Array): string {
    if (this.keys === null) return createHash("sha256").update(plain).digest("hex");
    return createHmac("sha256", this.keys.idKey).update(plain).digest("hex");
  }

  /** A new stored object for `plain` (allocates; encodeInto is the path of bulk chunk traffic). */
  encode(plain: Uint8Array): Uint8Array {
    if (plain.length > this.plainLengthMax)
      throw new BlockError("EINVAL", `Object of ${plain.length} bytes exceeds ${this.plainLengthMax}`);
    const out = Buffer.allocUnsafe(storedBytesBound(plain.length));
    return out.subarray(0, this.encodeInto(plain, out));
  }

  /**
   * Encodes `plain` into `out` (at least storedBytesBound(plain.length) bytes) and returns the stored
   * length. Allocates nothing of the chunk's size: zstd writes into `out`, AES-GCM works in place in slices.
   */
  encodeInto(plain: Uint8Array, out: Uint8Array): number {
    if (plain.length > this.plainLengthMax)
      throw new BlockError("EINVAL", `Object of ${plain.length} bytes exceeds ${this.plainLengthMax}`);
    if (out.length < storedBytesBound(plain.length))
      throw new BlockError("EINVAL", `Output of ${out.length} bytes is too small to encode ${plain.length}`);
    const encrypted = this.keys !== null;
    const bodyStart = objectHeaderBytes + (encrypted ? nonceBytes : 0);
    let flags = 0;
    let bodyLength = plain.length;
    const compressedLength = this.cctx.compress2(out.subarray(bodyStart), plain);
    if (compressedLength < plain.length) {
      flags |= flagZstd;
      bodyLength = compressedLength;
    } else {
      out.set(plain, bodyStart);
    }
    const header = Buffer.from(out.buffer, out.byteOffset, objectHeaderBytes);
    header.writeUInt32LE(objectMagic, 0);
    header.writeUInt8(objectFormatVersion, 4);
    header.writeUInt8(flags | (encrypted ? flagAesGcm : 0), 5);
    header.writeUInt16LE(0, 6);
    header.writeUInt32LE(plain.length, 8);
    let payloadLength = bodyLength;
    if (this.keys !== null) {
      const nonce = out.subarray(objectHeaderBytes, bodyStart);
      randomFillSync(nonce);
      const cipher = createCipheriv("aes-256-gcm", this.keys.encryptionKey, nonce);
      cipher.setAAD(header.subarray(0, 12));
      let at = bodyStart;
      const bodyEnd = bodyStart + bodyLength;
      for (; at < bodyEnd; at += cipherSliceBytes) {
        const sliceEnd = Math.min(at + cipherSliceBytes, bodyEnd);
        const done = cipher.update(out.subarray(at, sliceEnd));
        out.set(done, at);
        if (done.length !== sliceEnd - at) throw new BlockError("EIO", "AES-GCM returned a short slice");
      }
      cipher.final();
      out.set(cipher.getAuthTag(), bodyEnd);
      payloadLength = nonceBytes + bodyLength + tagBytes;
    }
    header.writeUInt32LE(crc32(out.subarray(objectHeaderBytes, objectHeaderBytes + payloadLength)), 12);
    return objectHeaderBytes + payloadLength;
  }

  /** CRC and header only: what `verify` can check without the key. Throws a BlockError("EIO"). */
  checkStored(stored: Uint8Array, name: string): void {
    this.parseHeader(stored, name);
  }

  /** A new buffer with the plain bytes of `stored` (allocates; decodeInto is the bulk path). */
  decode(stored: Uint8Array, name: string, expectedId: string | null): Uint8Array {
    const { flags, plainLength } = this.parseHeader(stored, name);
    const out = Buffer.allocUnsafe(plainLength);
    // Decrypting works in place: on a copy, so the caller's bytes stay as they were.
    const own = (flags & flagAesGcm) !== 0 ? Buffer.from(stored) : stored;
    return out.subarray(0, this.decodeInto(own, out, name, expectedId));
  }

  /**
   * Decodes `stored` into `out` and returns the plain length. Checks magic, version, CRC, tag, length and,
   * when `expectedId` is given, the content's id. Decrypts in place: `stored` is clobbered when encrypted.
   */
  decodeInto(stored: Uint8Array, out: Uint8Array, name: string, expectedId: string | null): number {
    const { flags, plainLength, payload } = this.parseHeader(stored, name);
    if (plainLength > out.length)
      throw corrupt(name, `claims ${plainLength} bytes, more than ${out.length} expected`);
    let body: Uint8Array = payload;
    if ((flags & flagAesGcm) !== 0) {
      if (this.keys === null)
        throw new BlockError("EACCES", `Object ${name} is encrypted and no key was given`);
      if (payload.length < nonceBytes + tagBytes) throw corrupt(name, "too short for its nonce and tag");
      const decipher = createDecipheriv(
        "aes-256-gcm",
        this.keys.encryptionKey,
        payload.subarray(0, nonceBytes),
      );
      decipher.setAAD(stored.subarray(0, 12));
      decipher.setAuthTag(payload.subarray(payload.length - tagBytes));
      body = payload.subarray(nonceBytes, payload.length - tagBytes);
      try {
        for (let at = 0; at < body.length; at += cipherSliceBytes) {
          const slice = body.subarray(at, Math.min(at + cipherSliceBytes, body.length));
          slice.set(decipher.update(slice));
        }
        decipher.final();
      } catch {
        throw new BlockError(
          "EACCES",
          `Object ${name} does not decrypt with this key (wrong key or tampered)`,
        );
      }
    } else if (this.keys !== null) {
      throw corrupt(name, "is not encrypted in an encrypted repository");
    }
    let length = body.length;
    if ((flags & flagZstd) !== 0) {
      const frameBytes = zstdContentSize(body);
      if (frameBytes !== plainLength)
        throw corrupt(
          name,
          `holds a zstd frame of ${frameBytes ?? "unknown"} bytes, header says ${plainLength}`,
        );
      try {
        length = this.dctx.decompress(out.subarray(0, plainLength), body);
      } catch (error) {
        throw corrupt(name, `does not decompress (${(error as Error).message})`);
      }
    } else if (length <= out.length) {
      out.set(body, 0);
    }
    if (length !== plainLength) throw corrupt(name, `holds ${length} bytes, header says ${plainLength}`);
    if (expectedId !== null && this.idOf(out.subarray(0, length)) !== expectedId)
      throw corrupt(name, "content does not match its id");
    return length;
  }

  private parseHeader(
    stored: Uint8Array,
    name: string,
  ): { flags: number; plainLength: number; payload: Uint8Array } {
    if (stored.length < objectHeaderBytes) throw corrupt(name, "is shorter than its header");
    const view = Buffer.from(stored.buffer, stored.byteOffset, stored.length);
    if (view.readUInt32LE(0) !== objectMagic) throw corrupt(name, "has no blocksnap object magic");
    const version = view.readUInt8(4);
    if (version !== objectFormatVersion)
      throw corrupt(name, `has object format ${version}, this blocksnap reads ${objectFormatVersion}`);
    const flags = view.readUInt8(5);
    const plainLength = view.readUInt32LE(8);
    if (plainLength > this.plainLengthMax) throw corrupt(name, `claims ${plainLength} bytes`);
    const payload = view.subarray(objectHeaderBytes);
    if (crc32(payload) !== view.readUInt32LE(12)) throw corrupt(name, "fails its CRC");
    return { flags, plainLength, payload };
  }
}

/** The content size a zstd frame declares, or null (not a frame, or a size it does not carry). */
function zstdContentSize(frame: Uint8Array): number | null {
  try {
    return zstd.getFrameContentSize(frame);
  } catch {
    return null;
  }
}

function corrupt(name: string, what: string): BlockError {
  return new BlockError("EIO", `Object ${name} ${what}`);
}

export function isAllZero(data: Uint8Array): boolean {
  // Compare 8 bytes at a time where aligned; Buffer.compare against a zero page is faster still.
  const zeroPage = zeroPageFor(Math.min(data.length, 65536));
  for (let offset = 0; offset < data.length; offset += zeroPage.length) {
    const end = Math.min(offset + zeroPage.length, data.length);
    if (
      Buffer.compare(
        Buffer.from(data.buffer, data.byteOffset + offset, end - offset),
        zeroPage.subarray(0, end - offset),
      ) !== 0
    )
      return false;
  }
  return true;
}

let zeroPageCache: Buffer = Buffer.alloc(0);
function zeroPageFor(lengthBytes: number): Buffer {
  if (zeroPageCache.length < lengthBytes) zeroPageCache = Buffer.alloc(lengthBytes);
  return zeroPageCache;
}
