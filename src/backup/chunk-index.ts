/**
 * ChunkIndex: a local cache of the chunk ids a remote repository holds, so "is this chunk stored?" costs no
 * request per chunk (an S3 HEAD per 4 MiB chunk would be most of a backup's requests).
 *
 * One file per repository, under the cache directory (BLOCKSNAP_CACHE_DIR, else $XDG_CACHE_HOME/blocksnap,
 * else ~/.cache/blocksnap), named by a hash of the store's identity (endpoint, bucket, prefix): a JSON
 * header line, then 32-byte binary ids appended as chunks are stored (O_APPEND, one write per id, so two
 * processes of one host can append together; a torn last record is ignored). The whole file is loaded into
 * a Set when the repository is first asked.
 *
 * Staleness. Writers only add chunks, so a missing id is harmless (the chunk is uploaded again; a PUT of
 * the same content replaces it). An id present in the index but gone from the store is dangerous (a
 * manifest would name a missing chunk); chunks disappear only by garbage collection, which first rewrites
 * the repository's `gc-marker` object. The index records the marker it was built against and is rebuilt
 * from a listing of `chunks/` when the marker differs, when the file is missing, unreadable, of another
 * format or older than maxAgeMs (which also picks up chunks other hosts stored, for dedup), or when a read
 * finds a chunk missing (objects deleted by hand). A rebuild writes a temporary file and renames it.
 *
 * Not done: the Set costs ~100 bytes per chunk (4 million chunks = 16 TiB of unique 4 MiB chunks ≈ 400 MiB).
 */
import { createHash, randomBytes } from "node:crypto";
import { appendFile, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";

export const chunkIndexFormat = "blocksnap-chunk-index";
export const chunkIndexMaxAgeMsDefault = 24 * 60 * 60 * 1000;
const idBytes = 32;

interface IndexHeader {
  readonly format: typeof chunkIndexFormat;
  readonly version: 1;
  readonly identity: string;
  /** The gc-marker content the listing was made after ("" when the repository had none). */
  readonly marker: string;
  readonly builtAtMs: number;
}

/** What the index needs of its repository. */
export interface ChunkIndexSource {
  /** The content of the repository's gc-marker object, "" when absent. */
  readMarker(): Promise<string>;
  /** Every chunk id the store holds (a listing). */
  listChunkIds(): AsyncIterable<string>;
}

export function chunkIndexDirectory(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BLOCKSNAP_CACHE_DIR) return env.BLOCKSNAP_CACHE_DIR;
  const cacheHome = env.XDG_CACHE_HOME || join(env.HOME || homedir(), ".cache");
  return join(cacheHome, "blocksnap");
}

export interface ChunkIndexStats {
  /** How the index was made ready: loaded from its file, or rebuilt (and why). */
  readonly source: "file" | "rebuilt";
  readonly reason: string;
  readonly ids: number;
}

export class ChunkIndex {
  readonly path: string;
  private readonly identity: string;
  private readonly source: ChunkIndexSource;
  private readonly maxAgeMs: number;
  private ids = new Set<string>();
  private marker = "";
  private ready: Promise<ChunkIndexStats> | null = null;
  private lastStats: ChunkIndexStats | null = null;

  constructor(
    identity: string,
    source: ChunkIndexSource,
    options: { directory?: string; maxAgeMs?: number } = {},
  ) {
    this.identity = identity;
    this.source = source;
    this.maxAgeMs = options.maxAgeMs ?? chunkIndexMaxAgeMsDefault;
    const name = createHash("sha256").update(identity).digest("hex").slice(0, 32);
    this.path = join(options.directory ?? chunkIndexDirectory(), "chunk-index", `${name}.idx`);
  }

  get stats(): ChunkIndexStats | null {
    return this.lastStats;
  }

  /** Loads or rebuilds the index once; later calls wait for the same work. */
  async prepare(): Promise<ChunkIndexStats> {
    this.ready ??= this.load().catch((error: unknown) => {
      this.ready = null;
      throw error;
    });
    return await this.ready;
  }

  async has(id: string): Promise<boolean> {
    await this.prepare();
    return this.ids.has(id);
  }

  /** Records a chunk just stored. */
  async add(id: string): Promise<void> {
    await this.prepare();
    if (this.ids.has(id)) return;
    this.ids.add(id);
    await appendFile(this.path, Buffer.from(id, "hex")).catch(() => undefined);
  }

  /** Rebuilds now when GC ran since the index was made (the marker changed). */
  async revalidate(): Promise<void> {
    await this.prepare();
    const marker = await this.source.readMarker();
    if (marker !== this.marker) {
      this.ready = this.rebuild(marker, "garbage collection ran since the index was built");
      await this.ready;
    }
  }

  /** Forgets the file: the next repository opened rebuilds it (a chunk the index named was missing). */
  async invalidate(): Promise<void> {
    await rm(this.path, { force: true }).catch(() => undefined);
  }

  private async load(): Promise<ChunkIndexStats> {
    const marker = await this.source.readMarker();
    let bytes: Buffer;
    try {
      bytes = await readFile(this.path);
    } catch {
      return await this.rebuild(marker, "no local index yet");
    }
    const newline = bytes.indexOf(0x0a);
    let header: Partial<IndexHeader> = {};
    try {
      header = JSON.parse(bytes.subarray(0, newline < 0 ? 0 : newline).toString("utf8")) as IndexHeader;
    } catch {
      return await this.rebuild(marker, "the local index is unreadable");
    }
    if (header.format !== chunkIndexFormat || header.version !== 1 || header.identity !== this.identity)
      return await this.rebuild(marker, "the local index is of another format or repository");
    if (header.marker !== marker)
      return await this.rebuild(marker, "garbage collection ran since the index was built");
    if (typeof header.builtAtMs !== "number" || Date.now() - header.builtAtMs > this.maxAgeMs)
      return await this.rebuild(marker, "the local index is older than its maximum age");
    const ids = new Set<string>();
    const body = bytes.subarray(newline + 1);
    for (let offset = 0; offset + idBytes <= body.length; offset += idBytes)
      ids.add(body.subarray(offset, offset + idBytes).toString("hex"));
    this.ids = ids;
    this.marker = marker;
    this.lastStats = { source: "file", reason: "loaded", ids: ids.size };
    return this.lastStats;
  }

  private async rebuild(marker: string, reason: string): Promise<ChunkIndexStats> {
    const ids = new Set<string>();
    for await (const id of this.source.listChunkIds()) ids.add(id);
    const header: IndexHeader = {
      format: chunkIndexFormat,
      version: 1,
      identity: this.identity,
      marker,
      builtAtMs: Date.now(),
    };
    const body = Buffer.alloc(ids.size * idBytes);
    let offset = 0;
    for (const id of ids) {
      body.write(id, offset, "hex");
      offset += idBytes;
    }
    const directory = join(this.path, "..");
    const temporary = `${this.path}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
    try {
      await mkdir(directory, { recursive: true, mode: 0o700 });
      await writeFile(temporary, Buffer.concat([Buffer.from(`${JSON.stringify(header)}\n`), body]), {
        mode: 0o600,
      });
      await rename(temporary, this.path);
    } catch {
      // A cache that cannot be written only costs a listing next time.
      await rm(temporary, { force: true }).catch(() => undefined);
    }
    this.ids = ids;
    this.marker = marker;
    this.lastStats = { source: "rebuilt", reason, ids: ids.size };
    return this.lastStats;
  }
}
