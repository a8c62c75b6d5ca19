/**
 * In-place reads (src/nbd/in-place-socket.ts): a connection on a server without TLS reads headers into
 * one reused buffer and large WRITE payloads straight into their own buffers. Seeded rounds of pipelined
 * WRITEs (1 B to 300 KiB, 4 KiB and 256 KiB among them) and READs go to a file export (the writer thread
 * writes the shared payload buffers where they are), sent as one byte stream cut at random places so that
 * headers and payloads straddle the socket's reads every which way. Each round's READs are checked against
 * a model; at the end nbdcopy, a client nobody here wrote, copies the export and it must equal the model.
 * Replay a failure with BLOCKSNAP_SEED=<seed>.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { missingTools, runOk } from "../helpers/commands.js";
import { Prng } from "../helpers/prng.js";
import type { TestServer } from "./nbd-test-helpers.js";
import { fileExport, startTestServer } from "./nbd-test-helpers.js";
import { NBD_CMD, RawNbdClient, requestBytes } from "./raw-nbd-client.js";

const sizeBytes = 8 * 1024 * 1024;
let fixture: TestServer;

before(async () => {
  fixture = await startTestServer([]);
  const { entry } = fileExport("disk", join(fixture.directory, "disk.img"), sizeBytes);
  fixture.source.add(entry);
});

after(async () => {
  await fixture.close();
});

interface Planned {
  readonly command: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  readonly payload: Buffer | undefined;
}

function writeLength(prng: Prng): number {
  const pick = prng.int(0, 9);
  if (pick === 0) return 4096;
  if (pick === 1) return 256 * 1024;
  if (pick < 5) return prng.int(1, 600);
  return prng.int(1, 300 * 1024);
}

/** One round: writes that do not overlap each other, reads that overlap none of them. */
function planRound(prng: Prng): Planned[] {
  const taken: Array<[number, number]> = [];
  const overlaps = (from: number, to: number) => taken.some(([start, end]) => from < end && start < to);
  const planned: Planned[] = [];
  const count = prng.int(1, 24);
  for (let attempt = 0; planned.length < count && attempt < 200; attempt += 1) {
    const isWrite = prng.next() < 0.6;
    const lengthBytes = isWrite ? writeLength(prng) : prng.int(1, 128 * 1024);
    const offsetBytes = prng.int(0, sizeBytes - lengthBytes);
    if (overlaps(offsetBytes, offsetBytes + lengthBytes)) continue;
    taken.push([offsetBytes, offsetBytes + lengthBytes]);
    const payload = isWrite
      ? Buffer.from(Array.from({ length: lengthBytes }, () => prng.int(0, 255)))
      : undefined;
    planned.push({ command: isWrite ? NBD_CMD.WRITE : NBD_CMD.READ, offsetBytes, lengthBytes, payload });
  }
  return planned;
}

/** Writes `stream` in pieces of random size, yielding to the event loop between some of them. */
async function dribble(client: RawNbdClient, stream: Buffer, prng: Prng): Promise<void> {
  let atBytes = 0;
  while (atBytes < stream.byteLength) {
    const pieceBytes = prng.next() < 0.3 ? prng.int(1, 40) : prng.int(1, 96 * 1024);
    client.write(stream.subarray(atBytes, atBytes + pieceBytes));
    atBytes += pieceBytes;
    if (prng.next() < 0.4) await new Promise((resolve) => setImmediate(resolve));
  }
}

test("pipelined WRITEs and READs cut at random places arrive intact through in-place reads", async (t) => {
  const prng = Prng.fromEnvironment();
  t.diagnostic(`seed ${prng.seed}`);
  const model = Buffer.alloc(sizeBytes);
  const client = await RawNbdClient.connect(fixture.socketPath);
  t.after(() => client.destroy());
  await client.handshake("disk");
  assert.equal(fixture.server.inPlaceCount, 1, "the connection reads in place");
  let cookie = 1n;
  for (let round = 0; round < 40; round += 1) {
    const planned = planRound(prng);
    const byCookie = new Map<bigint, Planned>();
    const parts: Buffer[] = [];
    for (const request of planned) {
      byCookie.set(cookie, request);
      parts.push(
        requestBytes({
          command: request.command,
          cookie,
          offset: BigInt(request.offsetBytes),
          length: request.lengthBytes,
          ...(request.payload === undefined ? {} : { payload: request.payload }),
        }),
      );
      cookie += 1n;
    }
    const sending = dribble(client, Buffer.concat(parts), prng);
    for (let answered = 0; answered < planned.length; answered += 1) {
      const reply = await client.readSimpleReply();
      const request = byCookie.get(reply.cookie);
      assert.ok(request, `round ${round}: a reply to a request sent (seed ${prng.seed})`);
      byCookie.delete(reply.cookie);
      assert.equal(reply.error, 0, `round ${round}: request succeeded (seed ${prng.seed})`);
      if (request.command !== NBD_CMD.READ) continue;
      const data = await client.read(request.lengthBytes);
      const expected = model.subarray(request.offsetBytes, request.offsetBytes + request.lengthBytes);
      assert.ok(data.equals(expected), `round ${round}: READ at ${request.offsetBytes} (seed ${prng.seed})`);
    }
    await sending;
    for (const request of planned) request.payload?.copy(model, request.offsetBytes);
  }
  const skip = missingTools("nbdcopy");
  if (skip) {
    t.diagnostic(`final check through nbdcopy skipped: ${skip}`);
    return;
  }
  const copyPath = join(fixture.directory, "copy.img");
  await runOk("nbdcopy", [fixture.uri("disk"), copyPath]);
  assert.ok((await readFile(copyPath)).equals(model), `nbdcopy's copy equals the model (seed ${prng.seed})`);
});
