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

export class InodeTable {
  private readonly source: ExportSource;
  /** Live nodes by export name. */
  private readonly byName = new Map<string, FileNode>();
  /** Every node the kernel may still name: live ones and dead ones still referenced. */
  private readonly byId = new Map<number, FileNode>();
  private nextNodeId = firstFileNodeId;

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
    node.lookupCount += 1;
  }

  forget(nodeId: number, lookupCount: number): void {
    const node = this.byId.get(nodeId);
    if (!node) return;
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

  /** Nodes held in memory (tests: dead nodes must not leak). */
  get size(): number {
    return this.byId.size;
  }

  private create(entry: Export): FileNode {
    assert(!this.byName.has(entry.name), `export ${entry.name} already has a live node`);
    const node: FileNode = {
      nodeId: this.nextNodeId,
      name: entry.name,
      entry,
      alive: true,
      lookupCount: 0,
      openCount: 0,
    };
    this.nextNodeId += 1;
    assert(Number.isSafeInteger(this.nextNodeId), "node ids exhausted");
    this.byName.set(entry.name, node);
    this.byId.set(node.nodeId, node);
    return node;
  }

  private retire(node: FileNode): void {
    node.alive = false;
    if (this.byName.get(node.name) === node) this.byName.delete(node.name);
    this.dropIfUnused(node);
  }

  private dropIfUnused(node: FileNode): void {
    if (!node.alive && node.lookupCount === 0 && node.openCount === 0) this.byId.delete(node.nodeId);
  }
}
