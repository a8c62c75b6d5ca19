/**
 * CBT over NBD: a snapshot image export carries `qemu:dirty-bitmap:cbt` and one
 * `qemu:dirty-bitmap:cbt-<generation>-<take>` per earlier take of its generation, proven with clients nobody
 * on this project wrote. Engine + NbdServer in process, a 4 MiB device with 64 KiB CBT blocks. qemu-io
 * writes the origin; the first take's image has no changed-blocks context (no earlier take to compare
 * with) and says its generation and take in its description; more writes, destroy, a second take
 * (changesNumber 2): its image shows exactly the blocks written between the takes, through nbdinfo (--map,
 * --json contexts), qemu-img map's x-dirty-bitmap (dirty read through the hole bit) and libnbd's
 * block_status (one chunk per selected context). A third take answers for either baseline; after a new
 * generation an NBD-only client finds its baseline's context gone.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError } from "../../src/block/errors.js";
import { Engine } from "../../src/engine/engine.js";
import { exportMetaContexts } from "../../src/nbd/export-meta-contexts.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import { missingTools, runOk } from "../helpers/commands.js";
import { hasLibnbdPython, libnbdPython } from "./nbd-test-helpers.js";

const kib = 1024;
const block = 64 * kib;
const sizeBytes = 4 * 1024 * kib;
const dirtyContext = "qemu:dirty-bitmap:cbt";
let directory: string;
let engine: Engine;
let server: NbdServer;
let socketPath: string;

const uri = (exportName: string) => `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`;

/** [offsetBytes, lengthBytes] spans. */
type Spans = Array<[number, number]>;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-nbd-cbt-"));
  socketPath = join(directory, "nbd.sock");
  engine = new Engine();
  server = new NbdServer(engine);
  await server.listenUnix(socketPath);
  await engine.addDevice({
    name: "disk0",
    backendPath: join(directory, "disk0.img"),
    sizeBytes,
    cbtBlockSizeBytes: block,
  });
});

after(async () => {
  await server.close();
  await engine.close();
  await rm(directory, { recursive: true, force: true });
});

async function takeImage(): Promise<{ id: string; image: string }> {
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 16 * 1024 * kib,
    devices: ["disk0"],
  });
  await engine.takeSnapshot(snapshot.id);
  return { id: snapshot.id, image: `disk0@${snapshot.id}` };
}

/** nbdinfo --map rows as [offsetBytes, lengthBytes, type, description]; checked contiguous over the device. */
async function nbdinfoRows(
  exportName: string,
  context: string,
): Promise<Array<[number, number, number, string]>> {
  const output = await runOk("nbdinfo", [`--map=${context}`, uri(exportName)]);
  const rows: Array<[number, number, number, string]> = [];
  let expectedOffsetBytes = 0;
  for (const line of output.split("\n")) {
    if (line.trim() === "") continue;
    // "offset length type description", e.g. "     65536     131072    1  dirty".
    const [offset, length, type, ...description] = line.trim().split(/\s+/);
    const row: [number, number, number, string] = [
      Number(offset),
      Number(length),
      Number(type),
      description.join(" "),
    ];
    assert.equal(row[0], expectedOffsetBytes, `nbdinfo rows are contiguous: ${output}`);
    expectedOffsetBytes = row[0] + row[1];
    rows.push(row);
  }
  assert.equal(expectedOffsetBytes, sizeBytes, `nbdinfo covers the device: ${output}`);
  return rows;
}

/** The spans nbdinfo --map=<context> (default qemu:dirty-bitmap:cbt) reports dirty (type 1), merged. */
async function dirtySpans(exportName: string, context = dirtyContext): Promise<Spans> {
  const spans: Spans = [];
  for (const [offset, length, type, description] of await nbdinfoRows(exportName, context)) {
    assert.equal(description, type === 1 ? "dirty" : "clean", "nbdinfo knows the dirty-bitmap namespace");
    if (type !== 1) continue;
    const last = spans.at(-1);
    if (last && last[0] + last[1] === offset) last[1] += length;
    else spans.push([offset, length]);
  }
  return spans;
}

let firstImage: { id: string; image: string };
let secondImage: { id: string; image: string };
const writtenBetweenTakes: Spans = [
  [3 * block, 2 * block],
  [20 * block, block],
  [63 * block, block],
];

let generationId = "";
const sinceContext = (generation: string, take: number) => `${dirtyContext}-${generation}-${take}`;

/** nbdinfo --json of one export: its description and contexts. */
async function exportListing(exportName: string): Promise<{ description: string; contexts: string[] }> {
  const listing = JSON.parse(await runOk("nbdinfo", ["--json", uri(exportName)])) as {
    exports: Array<{ description?: string; contexts: string[] }>;
  };
  const entry = listing.exports[0]!;
  return { description: entry.description ?? "", contexts: [...entry.contexts].sort() };
}

test("the first take of a generation has no changed-blocks context; its description names generation and take", async (t) => {
  const skip = missingTools("qemu-io", "nbdinfo");
  if (skip) return t.skip(skip);
  await runOk("qemu-io", ["-f", "raw", uri("disk0"), "-c", "write -P 0x11 0 128k", "-c", "write 640k 4k"]);
  firstImage = await takeImage();
  const cbt = engine.cbtInfo("disk0");
  generationId = cbt.generationId;
  assert.equal(cbt.changesNumber, 1);
  const listing = await exportListing(firstImage.image);
  assert.deepEqual(
    listing.contexts,
    ["base:allocation"],
    "no earlier take of this generation to compare with",
  );
  assert.match(listing.description, new RegExp(`CBT generation ${generationId} take 1$`));
  assert.deepEqual(await nbdinfoRows("disk0", "base:allocation"), [[0, sizeBytes, 0, "data"]]);
  const origin = await exportListing("disk0");
  assert.deepEqual(origin.contexts, ["base:allocation"], "the origin has no CBT context");
});

test("after a second take the image reports dirty exactly the blocks written between the takes", async (t) => {
  const skip = missingTools("qemu-io", "nbdinfo");
  if (skip) return t.skip(skip);
  if (!firstImage) return t.skip("needs the first test's snapshot");
  // 3..4 partly (a write inside a block marks the whole block), 20 by a few bytes, and the last block.
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri("disk0"),
    "-c",
    `write -P 0x22 ${3 * block + 512} ${block}`,
    "-c",
    `write ${20 * block + 4096} 4k`,
    "-c",
    `write ${sizeBytes - 4096} 4k`,
  ]);
  await engine.destroySnapshot(firstImage.id);
  secondImage = await takeImage();
  assert.equal(engine.cbtInfo("disk0").changesNumber, 2);
  assert.deepEqual(await dirtySpans(secondImage.image), writtenBetweenTakes);
  assert.deepEqual(await dirtySpans(secondImage.image, sinceContext(generationId, 1)), writtenBetweenTakes);
  // base:allocation still answers on the same export.
  assert.deepEqual(
    await nbdinfoRows(secondImage.image, "base:allocation"),
    [[0, sizeBytes, 0, "data"]],
    "a file-backed image reports data everywhere",
  );
  const listing = await exportListing(secondImage.image);
  assert.deepEqual(listing.contexts, ["base:allocation", dirtyContext, sinceContext(generationId, 1)]);
  assert.match(listing.description, new RegExp(`CBT generation ${generationId} take 2$`));
});

test("qemu-img map with x-dirty-bitmap reads the dirty blocks through the hole bit", async (t) => {
  const skip = missingTools("qemu-img");
  if (skip) return t.skip(skip);
  if (!secondImage) return t.skip("needs the second test's snapshot");
  const options = `driver=nbd,server.type=unix,server.path=${socketPath},export=${secondImage.image}`;
  const notDataSpans = async (imageOptions: string): Promise<Spans> => {
    const output = await runOk("qemu-img", ["map", "--output=json", "--image-opts", imageOptions]);
    const rows = JSON.parse(output) as Array<{ start: number; length: number; data: boolean }>;
    const spans: Spans = [];
    let expectedStart = 0;
    for (const row of rows) {
      assert.equal(row.start, expectedStart, output);
      expectedStart = row.start + row.length;
      if (row.data) continue;
      const last = spans.at(-1);
      if (last && last[0] + last[1] === row.start) last[1] += row.length;
      else spans.push([row.start, row.length]);
    }
    assert.equal(expectedStart, sizeBytes, output);
    return spans;
  };
  assert.deepEqual(await notDataSpans(options), [], "control: base:allocation says data everywhere");
  assert.deepEqual(await notDataSpans(`${options},x-dirty-bitmap=${dirtyContext}`), writtenBetweenTakes);
});

test("libnbd: BLOCK_STATUS with both contexts gets one chunk per context; LIST queries filter", async (t) => {
  if (!(await hasLibnbdPython())) return t.skip("requires /usr/bin/python3 with the nbd module");
  if (!secondImage) return t.skip("needs the second test's snapshot");
  const script = `
import json, sys, nbd
uri = sys.argv[1]
def listed(query):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.clear_meta_contexts()
    if query is not None:
        h.add_meta_context(query)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name))
    h.opt_abort()
    return sorted(names)
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("${dirtyContext}")
h.connect_uri(uri)
result = {"can": [h.can_meta_context("base:allocation"), h.can_meta_context("${dirtyContext}")]}
for name, flags in (("all", 0), ("one", nbd.CMD_FLAG_REQ_ONE)):
    calls = []
    h.block_status(h.get_size(), 0, lambda context, offset, entries, err: calls.append([context, offset, list(entries)]), flags)
    result[name] = calls
h.shutdown()
result["lists"] = {q or "": listed(q) for q in (None, "qemu:", "qemu:dirty-bitmap:", "base:", "x-unknown:")}
print(json.dumps(result))
`;
  const output = await runOk(libnbdPython, ["-c", script, uri(secondImage.image)]);
  const result = JSON.parse(output) as {
    can: boolean[];
    all: Array<[string, number, number[]]>;
    one: Array<[string, number, number[]]>;
    lists: Record<string, string[]>;
  };
  assert.deepEqual(result.can, [true, true]);
  for (const calls of [result.all, result.one]) {
    assert.deepEqual(calls.map(([context]) => context).sort(), ["base:allocation", dirtyContext]);
  }
  const dirtyEntries = result.all.find(([context]) => context === dirtyContext)![2];
  const dirty: Spans = [];
  let positionBytes = 0;
  for (let index = 0; index < dirtyEntries.length; index += 2) {
    const [lengthBytes, flags] = [dirtyEntries[index]!, dirtyEntries[index + 1]!];
    if (flags & 1) dirty.push([positionBytes, lengthBytes]);
    positionBytes += lengthBytes;
  }
  assert.equal(positionBytes, sizeBytes);
  assert.deepEqual(dirty, writtenBetweenTakes);
  for (const [context, , entries] of result.one) {
    assert.equal(entries.length, 2, `REQ_ONE: one extent for ${context}`);
  }
  const dirtyContexts = [dirtyContext, sinceContext(generationId, 1)];
  assert.deepEqual(result.lists, {
    "": ["base:allocation", ...dirtyContexts],
    "qemu:": dirtyContexts,
    "qemu:dirty-bitmap:": dirtyContexts,
    "base:": ["base:allocation"],
    "x-unknown:": [],
  });
});

test("image writes raise their blocks into the map (set_both); destroy removes the image export and fails its context", async (t) => {
  const skip = missingTools("qemu-io", "nbdinfo");
  if (skip) return t.skip(skip);
  if (!secondImage) return t.skip("needs the second test's snapshot");
  await runOk("qemu-io", ["-f", "raw", uri(secondImage.image), "-c", `write ${30 * block} 4k`]);
  assert.deepEqual(await dirtySpans(secondImage.image), [
    ...writtenBetweenTakes.slice(0, 2),
    [30 * block, block],
    ...writtenBetweenTakes.slice(2),
  ]);
  const image = engine.findExport(secondImage.image);
  assert.ok(image);
  const context = exportMetaContexts(image)[0]!;
  assert.equal(context.name, dirtyContext);
  await engine.destroySnapshot(secondImage.id);
  // A client still bound to the image must not see the map of a later take: the context fails like the image.
  await assert.rejects(
    context.extents(0, block),
    (error: unknown) => error instanceof BlockError && error.errno === "EIO",
  );
  const gone = await runOk("nbdinfo", ["--list", "--json", `nbd+unix://?socket=${socketPath}`]);
  const names = (JSON.parse(gone) as { exports: Array<{ "export-name": string }> }).exports.map(
    (entry) => entry["export-name"],
  );
  assert.deepEqual(names, ["disk0"], "the image export is gone with its snapshot");
});

/** What an NBD-only client sees when it asks for the changes since its baseline: can_meta_context per name. */
async function canSelect(exportName: string, contexts: readonly string[]): Promise<boolean[]> {
  const script = `
import json, sys, nbd
h = nbd.NBD()
for name in sys.argv[2:]:
    h.add_meta_context(name)
h.connect_uri(sys.argv[1])
print(json.dumps([h.can_meta_context(name) for name in sys.argv[2:]]))
h.shutdown()
`;
  return JSON.parse(await runOk(libnbdPython, ["-c", script, uri(exportName), ...contexts])) as boolean[];
}

test("a third take answers for either baseline; a new generation makes the old baseline's context vanish", async (t) => {
  const skip = missingTools("qemu-io", "nbdinfo");
  if (skip) return t.skip(skip);
  if (!(await hasLibnbdPython())) return t.skip("requires /usr/bin/python3 with the nbd module");
  if (!secondImage || generationId === "") return t.skip("needs the second test's snapshot");
  // The previous test destroyed the second snapshot. Between takes 2 and 3: blocks 40 and 50.
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri("disk0"),
    "-c",
    `write ${40 * block} 4k`,
    "-c",
    `write ${50 * block} 4k`,
  ]);
  const third = await takeImage();
  // set_both raised block 30 (written through the second image) in the live map too: it shows again.
  const sinceSecond: Spans = [
    [30 * block, block],
    [40 * block, block],
    [50 * block, block],
  ];
  assert.deepEqual(await dirtySpans(third.image), sinceSecond);
  assert.deepEqual(await dirtySpans(third.image, sinceContext(generationId, 2)), sinceSecond);
  // Since take 1: what changed between takes 1 and 2, and everything since.
  assert.deepEqual(await dirtySpans(third.image, sinceContext(generationId, 1)), [
    ...writtenBetweenTakes.slice(0, 2),
    ...sinceSecond,
    ...writtenBetweenTakes.slice(2),
  ]);
  const baselines = [sinceContext(generationId, 2), sinceContext(generationId, 3), sinceContext("other", 2)];
  assert.deepEqual(await canSelect(third.image, baselines), [true, false, false]);
  await engine.destroySnapshot(third.id);

  // Re-attaching the device starts a new generation: take 1 again, and no baseline of the old one.
  await engine.removeDevice("disk0");
  await engine.addDevice({
    name: "disk0",
    backendPath: join(directory, "disk0.img"),
    cbtBlockSizeBytes: block,
  });
  const fresh = await takeImage();
  const cbt = engine.cbtInfo("disk0");
  assert.notEqual(cbt.generationId, generationId);
  assert.equal(cbt.changesNumber, 1);
  assert.deepEqual(await canSelect(fresh.image, [dirtyContext, sinceContext(generationId, 2)]), [
    false,
    false,
  ]);
  const listing = await exportListing(fresh.image);
  assert.deepEqual(listing.contexts, ["base:allocation"]);
  assert.match(listing.description, new RegExp(`CBT generation ${cbt.generationId} take 1$`));
  await engine.destroySnapshot(fresh.id);
});

test("the first take after a restart offers only the generation contexts: the number before it may not be a take", async () => {
  const first = new Engine();
  const second = new Engine();
  try {
    await first.addDevice({
      name: "r0",
      backendPath: "memory:",
      sizeBytes: 1024 * kib,
      cbtBlockSizeBytes: block,
    });
    for (let take = 0; take < 2; take++) {
      const created = await first.createSnapshot({
        storage: "memory:",
        limitBytes: 4096 * kib,
        devices: ["r0"],
      });
      await first.takeSnapshot(created.id);
      const image = first.findExport(`r0@${created.id}`)!;
      const names = exportMetaContexts(image).map((context) => context.name);
      assert.equal(names.includes(dirtyContext), take === 1, `take ${take + 1} of this engine: ${names}`);
      await first.destroySnapshot(created.id);
    }
    const state = first.cbtState("r0");
    await second.addDevice({
      name: "r0",
      backendPath: "memory:",
      sizeBytes: 1024 * kib,
      cbtBlockSizeBytes: block,
      cbtState: state,
    });
    const created = await second.createSnapshot({
      storage: "memory:",
      limitBytes: 4096 * kib,
      devices: ["r0"],
    });
    await second.takeSnapshot(created.id);
    const image = second.findExport(`r0@${created.id}`)!;
    assert.equal(image.changedBlocks?.changesNumber, 3);
    assert.equal(image.changedBlocks?.previousChangesNumber, null);
    assert.deepEqual(
      exportMetaContexts(image).map((context) => context.name),
      [sinceContext(state.generationId, 1), sinceContext(state.generationId, 2)],
    );
  } finally {
    await first.close();
    await second.close();
  }
});
