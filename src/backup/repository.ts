/**
 * Repository: a deduplicating store of backups on an ObjectStore (docs/backup-format.md).
 *
 * Objects: `config` (plain JSON: format, version, chunk size, encryption and key check), `chunks/xx/<id>`
 * (immutable, content-named, encoded by ChunkCodec in the codec worker pool) and `manifests/<device>/<id>`
 * (one per backup, encoded like a chunk, written last). An interrupted backup therefore leaves only chunks
 * that no manifest names, which garbage collection removes after a grace period; it never leaves a manifest
 * that names a missing chunk. Chunks dedup across backups and devices: a chunk whose object already exists
 * is not written again.
 *
 * Concurrency: no repository lock. Writers only add objects, and a put is atomic; forget removes manifests,
 * and GC removes only chunks older than the grace period that no manifest names, so a backup running
 * beside GC keeps the chunks it has just written or found (see the format page for the one race left).
 */
import { randomBytes } from "node:crypto";
import { BlockError } from "../block/errors.js";
import { ChunkIndex } from "./chunk-index.js";
import { type ChunkSlot, ChunkSlots } from "./chunk-slots.js";
import { CodecPool, codecWorkersDefault } from "./codec-pool.js";
import { DirectoryStore } from "./directory-store.js";
import { type Manifest, newBackupId, parseManifest } from "./manifest.js";
import { type ObjectStore, StoreMissingError } from "./object-store.js";
import type { RepositoryKey } from "./repository-key.js";
import { openS3Store, type S3Settings } from "./s3-store.js";

export const repositoryFormat = "blocksnap-backup-repository";
export const repositoryVersion = 1;
export const chunkSizeBytesDefault = 4 << 20;
export const chunkSizeBytesMin = 64 << 10;
export const chunkSizeBytesMax = 64 << 20;
/** Bound on a decoded object: the largest chunk, or a manifest of a very large device. */
const objectPlainBytesMax = 512 << 20;
const configKey = "config";
/** The time of the last backup id made in this process (ids must sort in the order they were made). */
let lastBackupIdMs = 0;
/** Rewritten by garbage collection before it deletes chunks (chunk-index.ts). */
const garbageMarkerKey = "gc-marker";

export interface RepositoryConfig {
  readonly format: typeof repositoryFormat;
  readonly version: number;
  readonly chunkSizeBytes: number;
  readonly encryption: { readonly algorithm: "aes-256-gcm"; readonly keyCheck: string } | null;
  readonly createdAt: string;
}

export interface ManifestRef {
  readonly device: string;
  readonly id: string;
  readonly key: string;
  readonly modifiedMs: number;
}

export interface RepositoryOpenOptions {
  readonly key?: RepositoryKey | null;
  readonly codecWorkers?: number;
  /** Where a remote store's chunk index lives (default: chunkIndexDirectory()). */
  readonly chunkIndexDirectory?: string;
}

export class Repository {
  readonly store: ObjectStore;
  readonly config: RepositoryConfig;
  readonly codec: CodecPool;
  /** Remote stores only: the local index of stored chunks (chunk-index.ts). */
  readonly chunkIndex: ChunkIndex | null;

  private constructor(
    store: ObjectStore,
    config: RepositoryConfig,
    key: RepositoryKey | null,
    options: RepositoryOpenOptions,
  ) {
    this.store = store;
    this.config = config;
    this.codec = new CodecPool(key, objectPlainBytesMax, options.codecWorkers ?? codecWorkersDefault);
    this.chunkIndex =
      store.cacheIdentity === undefined
        ? null
        : new ChunkIndex(
            store.cacheIdentity,
            {
              readMarker: () => this.readGarbageMarker(),
              listChunkIds: () => this.listChunkIds(),
            },
            options.chunkIndexDirectory === undefined ? {} : { directory: options.chunkIndexDirectory },
          );
  }

  /** A repository location to its store: `s3://BUCKET/PREFIX` (with `s3` settings) or a local directory. */
  static storeFor(location: string, s3: S3Settings = {}): ObjectStore {
    if (location.startsWith("s3://")) return openS3Store(location, s3);
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(location))
      throw new BlockError("ENOTSUP", `Repository ${location}: a local directory or s3://BUCKET/PREFIX`);
    return new DirectoryStore(location);
  }

  /** Creates a repository in an empty or absent location. */
  static async init(
    store: ObjectStore,
    options: RepositoryOpenOptions & { chunkSizeBytes?: number } = {},
  ): Promise<Repository> {
    const chunkSizeBytes = options.chunkSizeBytes ?? chunkSizeBytesDefault;
    if (
      !Number.isInteger(Math.log2(chunkSizeBytes)) ||
      chunkSizeBytes < chunkSizeBytesMin ||
      chunkSizeBytes > chunkSizeBytesMax
    )
      throw new BlockError("EINVAL", `Chunk size ${chunkSizeBytes}: a power of two from 64K to 64M`);
    if ((await store.head(configKey)) !== null)
      throw new BlockError("EEXIST", `${store.location} already holds a backup repository`);
    for await (const _object of store.list("")) {
      throw new BlockError("EEXIST", `${store.location} is not empty and not a backup repository`);
    }
    const key = options.key ?? null;
    const config: RepositoryConfig = {
      format: repositoryFormat,
      version: repositoryVersion,
      chunkSizeBytes,
      encryption: key === null ? null : { algorithm: "aes-256-gcm", keyCheck: key.check },
      createdAt: new Date().toISOString(),
    };
    await store.put(configKey, Buffer.from(`${JSON.stringify(config, null, 2)}\n`));
    return new Repository(store, config, key, options);
  }

  static async open(store: ObjectStore, options: RepositoryOpenOptions = {}): Promise<Repository> {
    let bytes: Uint8Array;
    try {
      bytes = await store.get(configKey);
    } catch (error) {
      if (error instanceof BlockError && error.errno === "ENOENT" && !(error instanceof StoreMissingError))
        throw new BlockError("ENOENT", `${store.location} is not a blocksnap backup repository (no config)`);
      throw error;
    }
    const config = parseConfig(bytes, store.location);
    const key = options.key ?? null;
    if (config.encryption !== null) {
      if (key === null)
        throw new BlockError(
          "EACCES",
          `Repository ${store.location} is encrypted: give its key with --key FILE`,
        );
      if (key.check !== config.encryption.keyCheck)
        throw new BlockError("EACCES", `Wrong key for repository ${store.location}`);
    } else if (key !== null) {
      throw new BlockError("EINVAL", `Repository ${store.location} is not encrypted; it takes no --key`);
    }
    return new Repository(store, config, config.encryption === null ? null : key, options);
  }

  async close(): Promise<void> {
    await this.codec.close();
  }

  get chunkSizeBytes(): number {
    return this.config.chunkSizeBytes;
  }

  // ---- chunks ----

  static chunkKey(id: string): string {
    return `chunks/${id.slice(0, 2)}/${id}`;
  }

  /** From the chunk index of a remote store (no request), else a HEAD of the object. */
  async hasChunk(id: string): Promise<boolean> {
    if (this.chunkIndex !== null) return await this.chunkIndex.has(id);
    return (await this.store.head(Repository.chunkKey(id))) !== null;
  }

  async putChunk(id: string, stored: Uint8Array): Promise<void> {
    await this.store.put(Repository.chunkKey(id), stored);
    await this.chunkIndex?.add(id);
  }

  /**
   * putChunk for a backup's stream of chunks: on a local store its durability is deferred to a batch
   * (putPending), and the chunk is not visible (hasChunk false) until a full batch or syncChunks() made it
   * durable. Call syncChunks() before writing a manifest that names it.
   */
  async putChunkBatched(id: string, stored: Uint8Array): Promise<void> {
    if (this.store.putPending === undefined) return await this.putChunk(id, stored);
    await this.store.putPending(Repository.chunkKey(id), stored);
  }

  /** Every chunk putChunkBatched so far is durable and visible (a no-op on a store that has no deferred puts). */
  async syncChunks(): Promise<void> {
    await this.store.syncPending?.();
  }

  /**
   * Before a manifest is written: true when a chunk index answers hasChunk, after rebuilding it if garbage
   * collection ran meanwhile (so the caller checks every chunk the manifest names, at no request cost);
   * false for a local store (hasChunk asks the store).
   */
  async revalidateChunkIndex(): Promise<boolean> {
    if (this.chunkIndex === null) return false;
    await this.chunkIndex.revalidate();
    return true;
  }

  /** Called by GC before it deletes a chunk: other hosts' chunk indexes see the change and rebuild. */
  async markGarbageCollection(): Promise<void> {
    const marker = { at: new Date().toISOString(), nonce: randomBytes(8).toString("hex") };
    await this.store.put(garbageMarkerKey, Buffer.from(`${JSON.stringify(marker)}\n`));
  }

  private async readGarbageMarker(): Promise<string> {
    try {
      return Buffer.from(await this.store.get(garbageMarkerKey)).toString("utf8");
    } catch (error) {
      if (error instanceof BlockError && error.errno === "ENOENT" && !(error instanceof StoreMissingError))
        return "";
      throw error;
    }
  }

  private async *listChunkIds(): AsyncIterable<string> {
    for await (const chunk of this.listChunks()) yield chunk.id;
  }

  /** The plain bytes of a chunk, checked against its id (a wrong byte anywhere is EIO naming the chunk). */
  async readChunk(id: string): Promise<Uint8Array> {
    const key = Repository.chunkKey(id);
    let stored: Uint8Array;
    try {
      // The decode checks the content against the chunk's id: the store need not check it again.
      stored = await this.store.get(key, { contentChecked: true });
    } catch (error) {
      if (error instanceof BlockError && error.errno === "ENOENT") {
        // The index believed it stored (deleted by hand?): the next repository opened rebuilds it.
        await this.chunkIndex?.invalidate();
        throw new BlockError("EIO", `Chunk ${id} is missing from the repository`);
      }
      throw error;
    }
    return await this.codec.decode(stored, `chunk ${id}`, id, { handOver: true });
  }

  /**
   * readChunk into a slot (chunk-slots.ts), allocating nothing per chunk on a local store: the plain bytes,
   * checked against the id, as a view of `slot.plain` valid until the slot is given back.
   */
  async readChunkInto(id: string, slot: ChunkSlot): Promise<Uint8Array> {
    const key = Repository.chunkKey(id);
    let storedLength: number;
    try {
      if (this.store.getInto !== undefined) storedLength = await this.store.getInto(key, slot.stored);
      else {
        const stored = await this.store.get(key, { contentChecked: true });
        if (stored.length > slot.stored.length)
          throw new BlockError("EIO", `Chunk ${id} has ${stored.length} bytes, more than any chunk`);
        slot.stored.set(stored);
        storedLength = stored.length;
      }
    } catch (error) {
      if (error instanceof BlockError && error.errno === "ENOENT") {
        await this.chunkIndex?.invalidate();
        throw new BlockError("EIO", `Chunk ${id} is missing from the repository`);
      }
      throw error;
    }
    const plainLength = await this.codec.decodeInto(
      slot.stored.subarray(0, storedLength),
      slot.plain,
      `chunk ${id}`,
      id,
    );
    return slot.plain.subarray(0, plainLength);
  }

  /** Buffers for chunks in flight, sized for this repository's chunks. */
  newChunkSlots(): ChunkSlots {
    return new ChunkSlots(this.chunkSizeBytes);
  }

  async *listChunks(): AsyncIterable<{ id: string; sizeBytes: number; modifiedMs: number }> {
    for await (const object of this.store.list("chunks/")) {
      const id = object.key.slice(object.key.lastIndexOf("/") + 1);
      if (/^[0-9a-f]{64}$/.test(id)) yield { id, sizeBytes: object.sizeBytes, modifiedMs: object.modifiedMs };
    }
  }

  async deleteChunk(id: string): Promise<void> {
    await this.store.delete(Repository.chunkKey(id));
  }

  // ---- manifests ----

  /** Strictly later than every id this process made before, even within one millisecond. */
  newBackupId(): string {
    lastBackupIdMs = Math.max(Date.now(), lastBackupIdMs + 1);
    return newBackupId(new Date(lastBackupIdMs), randomBytes(3).toString("hex"));
  }

  /** Writes the manifest after every chunk it names is stored; atomic (the store's put). */
  async writeManifest(manifest: Manifest): Promise<void> {
    const plain = Buffer.from(JSON.stringify(manifest));
    const { stored } = await this.codec.encode(plain);
    if (stored === null) throw new BlockError("EINVAL", "An empty manifest");
    await this.store.put(manifestKey(manifest.device, manifest.id), stored);
  }

  async readManifest(ref: Pick<ManifestRef, "device" | "id">): Promise<Manifest> {
    const key = manifestKey(ref.device, ref.id);
    const stored = await this.store.get(key);
    const plain = await this.codec.decode(stored, `manifest ${ref.device}/${ref.id}`, null);
    const manifest = parseManifest(plain, `${ref.device}/${ref.id}`);
    if (manifest.device !== ref.device || manifest.id !== ref.id)
      throw new BlockError("EIO", `Manifest ${key} names backup ${manifest.device}/${manifest.id}`);
    return manifest;
  }

  /** Every backup, oldest first (ids sort by time), of one device or of all. */
  async listManifests(device?: string): Promise<ManifestRef[]> {
    const refs: ManifestRef[] = [];
    for await (const object of this.store.list(
      device === undefined ? "manifests/" : `manifests/${device}/`,
    )) {
      const parts = object.key.split("/");
      if (parts.length !== 3 || parts[1] === undefined || parts[2] === undefined) continue;
      refs.push({ device: parts[1], id: parts[2], key: object.key, modifiedMs: object.modifiedMs });
    }
    return refs.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : a.device.localeCompare(b.device)));
  }

  /** `DEVICE/ID`, an id, or `DEVICE/latest`. */
  async resolve(reference: string): Promise<ManifestRef> {
    const slash = reference.indexOf("/");
    const device = slash < 0 ? undefined : reference.slice(0, slash);
    const id = slash < 0 ? reference : reference.slice(slash + 1);
    const refs = await this.listManifests(device);
    const found = id === "latest" ? refs.slice(-1) : refs.filter((ref) => ref.id === id);
    if (found.length === 0)
      throw new BlockError("ENOENT", `No backup ${reference} in ${this.store.location}`);
    if (found.length > 1)
      throw new BlockError("EINVAL", `Backup id ${reference} is ambiguous: give DEVICE/ID`);
    return found[0] as ManifestRef;
  }

  async deleteManifest(ref: Pick<ManifestRef, "device" | "id">): Promise<void> {
    await this.store.delete(manifestKey(ref.device, ref.id));
  }
}

function manifestKey(device: string, id: string): string {
  return `manifests/${device}/${id}`;
}

function parseConfig(bytes: Uint8Array, location: string): RepositoryConfig {
  let parsed: Partial<RepositoryConfig>;
  try {
    parsed = JSON.parse(Buffer.from(bytes).toString("utf8")) as Partial<RepositoryConfig>;
  } catch {
    throw new BlockError("EINVAL", `${location} is not a blocksnap backup repository (config is not JSON)`);
  }
  if (parsed.format !== repositoryFormat)
    throw new BlockError("EINVAL", `${location} is not a blocksnap backup repository (foreign format)`);
  if (typeof parsed.version !== "number" || parsed.version > repositoryVersion)
    throw new BlockError(
      "ENOTSUP",
      `Repository ${location} has format version ${parsed.version}; this blocksnap reads up to ${repositoryVersion}`,
    );
  if (
    typeof parsed.chunkSizeBytes !== "number" ||
    !Number.isInteger(Math.log2(parsed.chunkSizeBytes)) ||
    parsed.chunkSizeBytes < chunkSizeBytesMin ||
    parsed.chunkSizeBytes > chunkSizeBytesMax
  )
    throw new BlockError("EINVAL", `Repository ${location} has an invalid chunk size`);
  return parsed as RepositoryConfig;
}
