/**
 * Bad input through the real binary: usage errors exit 2, refused operations exit 1, each with a
 * `blocksnap: ` message (and with --json an error object carrying the errno), and none changes the
 * daemon's state. An unreachable daemon says how to start one.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { SnapshotView, StatusView } from "../../src/daemon/api-types.js";
import { cleanEnvironment, DaemonProcess, runCli } from "./cli-harness.js";

let directory = "";
let daemon: DaemonProcess;
let takenId = "";
let createdId = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-bad-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  await daemon.cliOk(["device", "add", "d0", "--backend", "memory:", "--size", "1M"]);
  await daemon.cliOk(["device", "add", "d1", "--backend", "memory:", "--size", "1M"]);
  await daemon.cliOk(["device", "add", "free", "--backend", "memory:", "--size", "1M"]);
  takenId = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--device", "d0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", takenId]);
  createdId = (await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "1M"])).trim();
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

/** Runs `check` over the cases, a few processes at a time: none of them changes the daemon's state. */
async function inBatches<T>(cases: readonly T[], check: (item: T) => Promise<void>): Promise<void> {
  const batchSize = 4;
  for (let start = 0; start < cases.length; start += batchSize) {
    await Promise.all(cases.slice(start, start + batchSize).map(check));
  }
}

/** The daemon's state without what changes on its own (nothing here should). */
async function state(): Promise<unknown> {
  const status = await daemon.cliJson<StatusView>(["status"]);
  return { devices: status.devices, unavailable: status.devicesUnavailable, snapshots: status.snapshots };
}

void test("usage errors exit 2 with a blocksnap: message and reach no daemon", async () => {
  const cases: [string[], RegExp][] = [
    [[], /blocksnap: |Usage: blocksnap/],
    [["frobnicate"], /unknown command 'frobnicate'/],
    [["device"], /Usage: blocksnap device/],
    [["device", "frob"], /unknown command 'frob'/],
    [["device", "list", "--frob"], /unknown option '--frob'/],
    [["device", "add", "x"], /required option '--backend <path>' not specified/],
    [["device", "add", "--backend", "/x"], /missing required argument 'name'/],
    [["device", "add", "x", "--backend", "/x", "--size", "12Q"], /invalid size "12Q"/],
    [["device", "add", "x", "--backend", "/x", "--size", "1.5G"], /invalid size/],
    [
      ["device", "add", "x", "--backend", "/x", "--cbt-block-size", "-4K"],
      /argument '-4K' is invalid|invalid size/,
    ],
    [["device", "remove", "a", "b"], /too many arguments/],
    [["cbt", "mark-dirty", "d0", "--range", "4096"], /invalid range "4096"/],
    [["cbt", "mark-dirty", "d0", "--range", "0:0"], /the length is zero/],
    [["cbt", "mark-dirty", "d0"], /required option '--range/],
    [["cbt", "read", "d0"], /required option '--out <file>'/],
    [["snapshot", "create", "--storage", "memory:"], /required option '--limit <size>'/],
    [
      ["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--on-cow-error", "ignore"],
      /Allowed choices are/,
    ],
    [["snapshot", "wait-event", "x"], /required option '--timeout <ms>'/],
    [["snapshot", "wait-event", "x", "--timeout", "soon"], /invalid timeout "soon"/],
    [["snapshot", "wait-event", "x", "--timeout", "3600001"], /out of range/],
    [["snapshot", "take"], /missing required argument 'id'/],
    [["serve", "--nbd-listen", "localhost"], /expected HOST:PORT/],
    [["serve", "--log-level", "loud"], /Allowed choices are/],
  ];
  const before = await state();
  // The socket comes from the environment: `--state-dir` is not an option of groups such as `device`.
  const env = cleanEnvironment({ BLOCKSNAP_SOCKET: daemon.controlSocket });
  await inBatches(cases, async ([args, message]) => {
    const result = await runCli(args, { env });
    assert.equal(result.code, 2, `blocksnap ${args.join(" ")}: exit ${result.code}\n${result.stderr}`);
    assert.match(result.stderr, message, `blocksnap ${args.join(" ")}`);
    if (args.length > 0 && args.join(" ") !== "device") {
      assert.match(result.stderr, /^blocksnap: /m, `blocksnap ${args.join(" ")}`);
    }
  });
  assert.deepEqual(await state(), before);
});

void test("usage errors with --json also print an EINVAL error object on stdout", async () => {
  const env = cleanEnvironment({ BLOCKSNAP_SOCKET: daemon.controlSocket });
  const cases: string[][] = [
    ["device", "list", "--frob", "--json"],
    ["device", "add", "x", "--backend", "/x", "--size", "12Q", "--json"],
    ["snapshot", "wait-event", "x", "--json"],
  ];
  await inBatches(cases, async (args) => {
    const result = await runCli(args, { env });
    assert.equal(result.code, 2, `blocksnap ${args.join(" ")}: exit ${result.code}\n${result.stderr}`);
    const body = JSON.parse(result.stdout) as { error: { errno: string; message: string } };
    assert.equal(body.error.errno, "EINVAL", `blocksnap ${args.join(" ")}`);
    assert.ok(body.error.message.length > 0 && !body.error.message.includes("\n"), body.error.message);
    assert.match(result.stderr, /^blocksnap: /m);
  });
  const text = await runCli(["device", "list", "--frob"], { env });
  assert.equal(text.stdout, "", "no JSON without --json");
});

void test("refused operations exit 1 with the errno, in text and in --json, and change nothing", async () => {
  const cases: [string[], string][] = [
    [["cbt", "info", "nope"], "ENOENT"],
    [["cbt", "read", "nope", "--out", join(directory, "never")], "ENOENT"],
    [["cbt", "mark-dirty", "d1", "--range", "1M:4K"], "EINVAL"],
    [["device", "add", "d0", "--backend", "memory:", "--size", "1M"], "EEXIST"],
    [["device", "add", "bad/name", "--backend", "memory:", "--size", "1M"], "EINVAL"],
    [["device", "add", "tiny", "--backend", "memory:", "--size", "1000"], "EINVAL"],
    [["device", "add", "empty", "--backend", "memory:", "--size", "0"], "EINVAL"],
    [["device", "add", "nofile", "--backend", join(directory, "absent.img")], "ENOENT"],
    [["device", "remove", "nope"], "ENOENT"],
    [["device", "remove", "d0"], "EBUSY"],
    [["snapshot", "info", "00000000-0000-0000-0000-000000000000"], "ESRCH"],
    [["snapshot", "take", "not-an-id"], "ESRCH"],
    [["snapshot", "destroy", "00000000-0000-0000-0000-000000000000"], "ESRCH"],
    [["snapshot", "wait-event", "00000000-0000-0000-0000-000000000000", "--timeout", "0"], "ESRCH"],
    [["snapshot", "watch", "00000000-0000-0000-0000-000000000000"], "ESRCH"],
    [["snapshot", "take", "TAKEN"], "EALREADY"],
    [["snapshot", "add", "TAKEN", "--device", "free"], "EPERM"],
    [["snapshot", "add", "CREATED", "--device", "d0"], "EBUSY"],
    [["snapshot", "add", "CREATED", "--device", "nope"], "ENOENT"],
    [["snapshot", "take", "CREATED"], "ENODEV"],
    [["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--device", "nope"], "ENOENT"],
    [["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--chunk-size", "3K"], "EINVAL"],
    [["snapshot", "create", "--storage", "memory:", "--limit", "2", "--device", "free"], "EINVAL"],
  ];
  const before = await state();
  await inBatches(cases, async ([template, errno]) => {
    const args = template.map((arg) => (arg === "TAKEN" ? takenId : arg === "CREATED" ? createdId : arg));
    const text = await daemon.cli(args);
    assert.equal(text.code, 1, `blocksnap ${args.join(" ")}: exit ${text.code}\n${text.stderr}`);
    assert.match(
      text.stderr,
      new RegExp(`^blocksnap: .+ \\(${errno}\\)$`, "m"),
      `blocksnap ${args.join(" ")}`,
    );
    const json = await daemon.cli([...args, "--json"]);
    assert.equal(json.code, 1);
    const body = JSON.parse(json.stdout) as { error: { errno: string; message: string } };
    assert.equal(body.error.errno, errno, `blocksnap ${args.join(" ")} --json`);
  });
  assert.deepEqual(await state(), before);
  const created = await daemon.cliJson<SnapshotView>(["snapshot", "info", createdId]);
  assert.equal(created.state, "created");
  // The API gives the take's stall in whole microseconds (three decimals of ms at most).
  const taken = await daemon.cliJson<SnapshotView>(["snapshot", "info", takenId]);
  assert.match(String(taken.takeStallMs), /^\d+(\.\d{1,3})?$/);
});

void test("a storage limit below one chunk is refused at create, in one line naming both numbers", async () => {
  const result = await daemon.cli(["snapshot", "create", "--storage", "memory:", "--limit", "2"]);
  assert.equal(result.code, 1, result.stderr);
  const lines = result.stderr.trim().split("\n");
  assert.equal(lines.length, 1, result.stderr);
  assert.match(lines[0] ?? "", /^blocksnap: .*\b2\b.*\b262144\b.* \(EINVAL\)$/);
});

void test("a device size below 4 KiB is refused with a readable message", async () => {
  for (const size of ["0", "1000", "4095"]) {
    const result = await daemon.cli(["device", "add", "tiny", "--backend", "memory:", "--size", size]);
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /^blocksnap: .*size must be at least 4096 bytes \(EINVAL\)$/m, result.stderr);
  }
});

void test("a snapshot id may be shortened to a unique prefix of at least 4 characters", async () => {
  const prefix = takenId.slice(0, 8);
  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", prefix]);
  assert.equal(info.id, takenId);
  const event = await daemon.cli(["snapshot", "wait-event", prefix, "--timeout", "0", "--json"]);
  assert.equal(event.code, 0, event.stderr);
  const take = await daemon.cli(["snapshot", "take", prefix]);
  assert.match(take.stderr, /\(EALREADY\)$/m, "the prefix reached the taken snapshot");
  const short = await daemon.cli(["snapshot", "info", takenId.slice(0, 3)]);
  assert.match(short.stderr, /\(ESRCH\)$/m, "3 characters are not a prefix");
});

void test("an unreachable daemon: exit 1 and a hint to run blocksnap serve", async () => {
  const result = await runCli(["status", "--socket", join(directory, "nobody.sock")]);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /^blocksnap: .*not running.*blocksnap serve/m);
  const version = await runCli(["version", "--socket", join(directory, "nobody.sock"), "--json"]);
  assert.equal(version.code, 0);
  assert.equal(JSON.parse(version.stdout).daemon, null);
});

void test("every command has --help with an example, exit 0", async () => {
  const commands = [
    ["serve"],
    ["status"],
    ["version"],
    ["device", "add"],
    ["device", "remove"],
    ["device", "list"],
    ["cbt", "info"],
    ["cbt", "read"],
    ["cbt", "mark-dirty"],
    ["snapshot", "create"],
    ["snapshot", "add"],
    ["snapshot", "append-storage"],
    ["snapshot", "take"],
    ["snapshot", "info"],
    ["snapshot", "list"],
    ["snapshot", "wait-event"],
    ["snapshot", "watch"],
    ["snapshot", "destroy"],
  ];
  await inBatches(commands, async (command) => {
    const result = await runCli([...command, "--help"]);
    assert.equal(result.code, 0, command.join(" "));
    assert.match(result.stdout, new RegExp(`Usage: blocksnap ${command.join(" ")}`));
    assert.match(result.stdout, /Examples?:\n {2}\$ blocksnap /);
    if (command[0] !== "serve") assert.match(result.stdout, /--json/);
  });
});
