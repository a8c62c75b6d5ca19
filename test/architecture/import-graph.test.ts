/**
 * The layer rules of the source tree (docs/design/architecture.md, "Rooms and the direction of imports"), checked on every build: each
 * room (a folder of src/) may import only the rooms listed for it below, and no module imports itself
 * through a chain (no cycles). Imports are read with TypeScript's own pre-processor, so comments and
 * strings do not count and type-only and dynamic imports do. Test files (*.test.ts) are not checked.
 *
 * A new room fails this test until it gets a line in `allowedImports`: decide where it sits first.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import ts from "typescript";

const sourceRoot = resolve("src");

/**
 * Room → the rooms it may import (besides itself). Data flows down: util and block at the bottom, then
 * backends and CBT, storage, copy-before-write, the engine; the faces (nbd, fuse) know only the block
 * interface; freeze implements the engine's Freezer seam; the daemon wires everything; the supervisor
 * (serve --supervise) holds sockets and /dev/fuse with the daemon's socket helpers and FUSE mount chores
 * but no engine code; the CLI is a client of the daemon's API (its wire types) and never reaches into the
 * engine or what is below it.
 */
const allowedImports: Readonly<Record<string, readonly string[]>> = {
  util: [],
  block: ["util"],
  backends: ["block", "util"],
  cbt: ["block", "util"],
  storage: ["backends", "block", "util"],
  cow: ["block", "cbt", "storage", "util"],
  engine: ["backends", "block", "cbt", "cow", "storage", "util"],
  freeze: ["block", "engine", "util"],
  nbd: ["block", "util"],
  fuse: ["block", "util"],
  persist: ["backends", "block", "cbt", "util"],
  backup: ["block", "cbt", "util"],
  metrics: ["block", "util"],
  daemon: [
    "backends",
    "block",
    "cbt",
    "cow",
    "engine",
    "freeze",
    "fuse",
    "nbd",
    "backup",
    "metrics",
    "persist",
    "storage",
    "util",
  ],
  supervisor: ["block", "daemon", "fuse", "util"],
  cli: ["backup", "block", "daemon", "nbd", "supervisor", "util"],
};

/** Rules the issue states in words, kept separately so a loosened table cannot silently break them. */
const forbiddenImports: readonly { readonly from: readonly string[]; readonly to: readonly string[] }[] = [
  { from: ["nbd", "fuse"], to: ["engine", "cow", "cbt", "storage", "backends", "daemon", "cli", "freeze"] },
  { from: ["cli"], to: ["engine", "cow", "storage", "cbt", "backends"] },
  { from: ["util", "block", "backends", "cbt", "storage", "cow"], to: ["engine", "daemon", "cli"] },
  { from: ["engine"], to: ["nbd", "fuse", "daemon", "cli"] },
  // The supervisor must survive what kills an engine: no engine code in it.
  { from: ["supervisor"], to: ["engine", "cow", "storage", "cbt", "backends", "nbd", "freeze"] },
];

interface SourceModule {
  /** Path relative to src/, e.g. `engine/engine.ts`. */
  readonly path: string;
  readonly room: string;
  /** Resolved src-relative paths of the modules it imports (only those inside src/). */
  readonly imports: readonly string[];
}

function listSources(directory: string, found: string[] = []): string[] {
  for (const entry of readdirSync(directory)) {
    const path = join(directory, entry);
    if (statSync(path).isDirectory()) listSources(path, found);
    else if (entry.endsWith(".ts") && !entry.endsWith(".d.ts")) found.push(path);
  }
  return found;
}

function roomOf(srcRelativePath: string): string {
  const slash = srcRelativePath.indexOf("/");
  return slash < 0 ? "" : srcRelativePath.slice(0, slash);
}

function readModule(absolutePath: string): SourceModule {
  const text = readFileSync(absolutePath, "utf8");
  const info = ts.preProcessFile(text, true, true);
  const imports: string[] = [];
  for (const reference of info.importedFiles) {
    const specifier = reference.fileName;
    if (!specifier.startsWith(".")) continue;
    const target = resolve(dirname(absolutePath), specifier.replace(/\.js$/, ".ts"));
    const fromRoot = relative(sourceRoot, target);
    assert.ok(
      !fromRoot.startsWith(".."),
      `${relative(".", absolutePath)} imports ${specifier}, outside src/`,
    );
    imports.push(fromRoot);
  }
  const path = relative(sourceRoot, absolutePath);
  return { path, room: roomOf(path), imports };
}

const modules = listSources(sourceRoot).map(readModule);
const productionModules = modules.filter((module) => !module.path.endsWith(".test.ts"));

test("import graph: every source file was read and has imports to check", () => {
  assert.ok(productionModules.length > 50, `only ${productionModules.length} source files found under src/`);
  const edges = productionModules.reduce((sum, module) => sum + module.imports.length, 0);
  assert.ok(edges > 100, `only ${edges} imports found: the import reader is broken`);
});

test("import graph: every room has a place in the layer table", () => {
  const unknown = [...new Set(productionModules.map((module) => module.room))].filter(
    (room) => !(room in allowedImports),
  );
  assert.deepEqual(
    unknown,
    [],
    `rooms without a layer (add them to allowedImports in test/architecture/import-graph.test.ts): ${unknown}`,
  );
});

function layerViolations(sources: readonly SourceModule[]): string[] {
  const violations: string[] = [];
  for (const module of sources) {
    const allowed = allowedImports[module.room] ?? [];
    for (const target of module.imports) {
      const targetRoom = roomOf(target);
      if (targetRoom === module.room) continue;
      if (!allowed.includes(targetRoom)) violations.push(`${module.path} → ${target}`);
    }
  }
  return violations;
}

test("import graph: no room imports one above it or beside it", () => {
  const violations = layerViolations(productionModules);
  assert.deepEqual(violations, [], `forbidden imports:\n${violations.join("\n")}`);
});

test("import graph: the stated rules hold (faces, CLI, leaf rooms, engine)", () => {
  const violations: string[] = [];
  for (const rule of forbiddenImports) {
    for (const module of productionModules) {
      if (!rule.from.includes(module.room)) continue;
      for (const target of module.imports) {
        if (rule.to.includes(roomOf(target))) violations.push(`${module.path} → ${target}`);
      }
    }
  }
  assert.deepEqual(violations, [], `forbidden imports:\n${violations.join("\n")}`);
  for (const rule of forbiddenImports) {
    for (const from of rule.from) {
      for (const to of rule.to) {
        assert.ok(!(allowedImports[from] ?? []).includes(to), `the layer table allows ${from} → ${to}`);
      }
    }
  }
});

function findCycles(sources: readonly SourceModule[]): string[] {
  const byPath = new Map(sources.map((module) => [module.path, module]));
  const state = new Map<string, "visiting" | "done">();
  const cycles: string[] = [];
  const stack: string[] = [];
  const visit = (path: string): void => {
    const mark = state.get(path);
    if (mark === "done") return;
    if (mark === "visiting") {
      cycles.push([...stack.slice(stack.indexOf(path)), path].join(" → "));
      return;
    }
    state.set(path, "visiting");
    stack.push(path);
    for (const target of byPath.get(path)?.imports ?? []) if (byPath.has(target)) visit(target);
    stack.pop();
    state.set(path, "done");
  };
  for (const path of byPath.keys()) visit(path);
  return cycles;
}

test("import graph: no cycles between modules", () => {
  const cycles = findCycles(productionModules);
  assert.deepEqual(cycles, [], `import cycles:\n${cycles.join("\n")}`);
});

test("import graph: the checker catches a forbidden import and a cycle", () => {
  const info = ts.preProcessFile(
    '// import "../engine/x.js"\nimport type { A } from "../engine/engine.js";\n',
    true,
    true,
  );
  assert.deepEqual(
    info.importedFiles.map((file) => file.fileName),
    ["../engine/engine.js"],
  );
  const face: SourceModule = {
    path: "nbd/face.ts",
    room: "nbd",
    imports: ["engine/engine.ts", "block/device.ts"],
  };
  assert.deepEqual(layerViolations([face]), ["nbd/face.ts → engine/engine.ts"]);
  const a: SourceModule = { path: "util/a.ts", room: "util", imports: ["util/b.ts"] };
  const b: SourceModule = { path: "util/b.ts", room: "util", imports: ["util/a.ts"] };
  assert.deepEqual(findCycles([a, b]), ["util/a.ts → util/b.ts → util/a.ts"]);
});
