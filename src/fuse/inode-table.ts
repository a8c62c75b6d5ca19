/**
 * InodeTable: which FUSE node id stands for which export. The root directory is node 1; every export
 * instance gets the next unused id (never reused while the mount lives), so a file keeps its inode
 * number while its export exists and a new export under an old name is a new inode: the kernel then
 * drops dentries and open files of the old one instead of silently switching them to new data.
 *
 * An export instance is recognised by its device object: the source may build a fresh Export record on
 * every call, but the device behind a name only changes when the export is replaced.
 *
 * A node dies when its export vanishes (reconcile(), called on source.onExportsChanged and by every
 * lookup); dead nodes answer EIO to open handles and are forgotten once the kernel has dropped every
 * lookup reference and every handle is released. Single-threaded: called on the main thread only.
 *
 * A successor process (fuse-session-state.ts) restores the live nodes by id and name; their lookup counts
 * are not known, so a restored node counts as looked up until its export vanishes, and is then dropped.
 */
import type { Export, ExportSource } from "../block/export-source.js";
import { assert } from "../util/assert.js";

export interface FileNode {
  readonly nodeId: number;
  readonly name: string;
  readonly entry: Export;
  alive: boolean;
  /** The kernel's nlookup for this node: lookups answered minus counts forgotten. */
  lookupCount: number;
  openCount: number;
}

const firstFileNodeId = 2;
/** The lookup count of a restored node: never reached by FORGETs, so it lives while its export does. */
const restoredLookupCount = Number.MAX_SAFE_INTEGER;

export class InodeTable {
  private readonly source: ExportSource;
  /** Live nodes by export name. */
  private readonly byName = new Map<string, FileNode>();
  /** Every node the kernel may still name: live ones and dead ones still referenced. */
  private readonly byId = new Map<number, FileNode>();
  private nextId = firstFileNodeId;

  constructor(source: ExportSource) {
    this.source = source;
  }

  /** The live node for `name`, created when the export is new; undefined when there is no such export. */
  find(name: string): FileNode | undefined {
    const entry = this.source.findExport(name);
    const known = this.byName.get(name);
    if (known && (!entry || entry.device !== known.entry.device)) this.retire(known);
    if (!entry) return undefined;
    return this.byName.get(name) ?? this.create(entry);
  }

  /** Live nodes of every current export, in the source's order. */
  list(): FileNode[] {
    this.reconcile();
    return this.source.listExports().map((entry) => this.byName.get(entry.name) ?? this.create(entry));
  }

  node(nodeId: number): FileNode | undefined {
    return this.byId.get(nodeId);
  }

  /** Marks nodes whose export vanished or was replaced as dead. */
  reconcile(): void {
    for (const node of [...this.byName.values()]) {
      const entry = this.source.findExport(node.name);
      if (!entry || entry.device !== node.entry.device) this.retire(node);
    }
  }

  lookedUp(node: FileNode): void {
    if (node.lookupCount < restoredLookupCount) node.lookupCount += 1;
  }

  forget(nodeId: number, lookupCount: number): void {
    const node = this.byId.get(nodeId);
    if (!node) return;
    if (node.lookupCount < restoredLookupCount)
      node.lookupCount = Math.max(0, node.lookupCount - lookupCount);
    this.dropIfUnused(node);
  }

  opened(node: FileNode): void {
    node.openCount += 1;
  }

  released(node: FileNode): void {
    assert(node.openCount > 0, `release of node ${node.nodeId} without an open handle`);
    node.openCount -= 1;
    this.dropIfUnused(node);
  }

  /** The id the next new node gets: it changes exactly when a node is created. */
  get nextNodeId(): number {
    return this.nextId;
  }

  /** The live nodes and the next id, for a successor process. */
  exportState(): { nextNodeId: number; nodes: { nodeId: number; name: string }[] } {
    return {
      nextNodeId: this.nextId,
      nodes: [...this.byName.values()].map((node) => ({ nodeId: node.nodeId, name: node.name })),
    };
  }

  /**
   * Takes over the numbering of a predecessor: nodes whose export is still there keep their id; the others
   * are left out, so the kernel's requests on them fail as on a vanished export. Only before any request.
   */
  restore(state: {
    readonly nextNodeId: number;
    readonly nodes: readonly { nodeId: number; name: string }[];
  }): void {
    assert(this.byId.size === 0 && this.nextId === firstFileNodeId, "restore into a used InodeTable");
    let nextNodeId = Math.max(firstFileNodeId, state.nextNodeId);
    for (const saved of state.nodes) {
      const entry = this.source.findExport(saved.name);
      if (!entry || saved.nodeId < firstFileNodeId || this.byName.has(saved.name)) continue;
      const node: FileNode = {
        nodeId: saved.nodeId,
        name: saved.name,
        entry,
        alive: true,
        lookupCount: restoredLookupCount,
        openCount: 0,
      };
      this.byName.set(node.name, node);
      this.byId.set(node.nodeId, node);
      nextNodeId = Math.max(nextNodeId, saved.nodeId + 1);
    }
    this.nextId = nextNodeId;
  }

  /** Nodes held in memory (tests: dead nodes must not leak). */
  get size(): number {
    return this.byId.size;
  }

  private create(entry: Export): FileNode {
    assert(!this.byName.has(entry.name), `export ${entry.name} already has a live node`);
    const node: FileNode = {
      nodeId: this.nextId,
      name: entry.name,
      entry,
      alive: true,
      lookupCount: 0,
      openCount: 0,
    };
    this.nextId += 1;
    assert(Number.isSafeInteger(this.nextId), "node ids exhausted");
    this.byName.set(entry.name, node);
    this.byId.set(node.nodeId, node);
    return node;
  }

  private retire(node: FileNode): void {
    node.alive = false;
    // Unknown FORGETs of a restored node: a request naming it after this fails like one on an unknown node.
    if (node.lookupCount === restoredLookupCount) node.lookupCount = 0;
    if (this.byName.get(node.name) === node) this.byName.delete(node.name);
    this.dropIfUnused(node);
  }

  private dropIfUnused(node: FileNode): void {
    if (!node.alive && node.lookupCount === 0 && node.openCount === 0) this.byId.delete(node.nodeId);
  }
}
