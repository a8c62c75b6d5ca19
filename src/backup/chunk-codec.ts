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
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from "node:crypto";
import { crc32 } from "node:zlib";
import { compress, decompress } from "zstd-napi";
import { BlockError } from "../block/errors.js";

export const objectMagic = 0x4b4f5342; // "BSOK" little-endian
export const objectFormatVersion = 1;
export const objectHeaderBytes = 16;
const flagZstd = 1;
const flagAesGcm = 2;
const nonceBytes = 12;
const tagBytes = 16;
const zstdLevel = 1;

export interface CodecKeys {
  /** 32 bytes: HMAC key naming chunks. */
  readonly idKey: Uint8Array;
  /** 32 bytes: AES-256-GCM key. */
  readonly encryptionKey: Uint8Array;
}

export class ChunkCodec {
  private readonly keys: CodecKeys | null;
  private readonly plainLengthMax: number;

  constructor(keys: CodecKeys | null, plainLengthMax: number) {
    this.keys = keys;
    this.plainLengthMax = plainLengthMax;
  }

  get encrypted(): boolean {
    return this.keys !== null;
  }

  idOf(plain: Uint8Array): string {
    if (this.keys === null) return createHash("sha256").update(plain).digest("hex");
    return createHmac("sha256", this.keys.idKey).update(plain).digest("hex");
  }

  encode(plain: Uint8Array): Uint8Array {
    if (plain.length > this.plainLengthMax)
      throw new BlockError("EINVAL", `Object of ${plain.length} bytes exceeds ${this.plainLengthMax}`);
    const compressed = compress(plain, { compressionLevel: zstdLevel });
    let flags = 0;
    let body: Uint8Array = plain;
    if (compressed.length < plain.length) {
      flags |= flagZstd;
      body = compressed;
    }
    const header = Buffer.alloc(objectHeaderBytes);
    header.writeUInt32LE(objectMagic, 0);
    header.writeUInt8(objectFormatVersion, 4);
    let payload: Uint8Array = body;
    if (this.keys !== null) {
      flags |= flagAesGcm;
      header.writeUInt8(flags, 5);
      header.writeUInt32LE(plain.length, 8);
      const nonce = randomBytes(nonceBytes);
      const cipher = createCipheriv("aes-256-gcm", this.keys.encryptionKey, nonce);
      cipher.setAAD(header.subarray(0, 12));
      const first = cipher.update(body);
      const last = cipher.final();
      payload = Buffer.concat([nonce, first, last, cipher.getAuthTag()]);
    } else {
      header.writeUInt8(flags, 5);
      header.writeUInt32LE(plain.length, 8);
    }
    header.writeUInt32LE(crc32(payload), 12);
    return Buffer.concat([header, payload]);
  }

  /** CRC and header only: what `verify` can check without the key. Throws a BlockError("EIO"). */
  checkStored(stored: Uint8Array, name: string): void {
    this.parseHeader(stored, name);
  }

  decode(stored: Uint8Array, name: string, expectedId: string | null): Uint8Array {
    const { flags, plainLength, payload } = this.parseHeader(stored, name);
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
      decipher.setAAD(Buffer.from(stored.buffer, stored.byteOffset, 12));
      decipher.setAuthTag(payload.subarray(payload.length - tagBytes));
      try {
        body = Buffer.concat([
          decipher.update(payload.subarray(nonceBytes, payload.length - tagBytes)),
          decipher.final(),
        ]);
      } catch {
        throw new BlockError(
          "EACCES",
          `Object ${name} does not decrypt with this key (wrong key or tampered)`,
        );
      }
    } else if (this.keys !== null) {
      throw corrupt(name, "is not encrypted in an encrypted repository");
    }
    let plain: Uint8Array = body;
    if ((flags & flagZstd) !== 0) {
      try {
        plain = decompress(body);
      } catch (error) {
        throw corrupt(name, `does not decompress (${(error as Error).message})`);
      }
    }
    if (plain.length !== plainLength)
      throw corrupt(name, `holds ${plain.length} bytes, header says ${plainLength}`);
    if (expectedId !== null && this.idOf(plain) !== expectedId)
      throw corrupt(name, "content does not match its id");
    return plain;
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
