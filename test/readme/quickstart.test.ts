/**
 * The README's quickstart, run as written: the block that starts the daemon (`npx blocksnap serve`) in the
 * background, the next block (device, loop, mkfs, snapshot, nbdcopy, cbt read, destroy, umount) with
 * `bash -eu -o pipefail` once the daemon answers; then the daemon gets SIGTERM and must exit 0.
 *
 * Isolation without touching the text: everything runs in a private mount namespace (`unshare --mount`)
 * with fresh tmpfs over /var/lib, /var/tmp and /mnt, so the README's /var/lib/blocksnap, /var/lib/images
 * and /mnt/disk0 are a fresh machine's, invisible to the host and gone with the namespace. `npx` is a shim
 * that runs this checkout's build (real npx would reinstall and rebuild the package). Clean-up, on success
 * and on failure: unmount what is mounted on the daemon's loop devices, detach them, stop the daemon. Every
 * step is bounded (`timeout`, and the whole run by runTimeoutMs).
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { which } from "../helpers/commands.js";

const readmePath = fileURLToPath(new URL("../../../README.md", import.meta.url));
const cliPath = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const runTimeoutMs = 600_000;
const tools = [
  "unshare",
  "losetup",
  "mkfs.ext4",
  "mount",
  "umount",
  "nbdcopy",
  "nbdinfo",
  "debugfs",
  "timeout",
];

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-quickstart-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** The ```sh blocks of the README's "## Quickstart" section (up to its first subsection). */
export function quickstartBlocks(readme: string): string[] {
  const start = readme.indexOf("\n## Quickstart\n");
  assert.ok(start >= 0, "README has a ## Quickstart section");
  const rest = readme.slice(start + 1);
  const end = rest.slice(1).search(/\n##+ /);
  const section = end < 0 ? rest : rest.slice(0, end + 1);
  return [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((match) => match[1] as string);
}

const orchestrator = `
set -u
for dir in /var/lib /var/tmp /mnt; do mount -t tmpfs -o size=4g,mode=0755 quickstart "$dir"; done
cd "$WORK"
bash serve.sh > serve.log 2>&1 &
SERVE=$!
cleanup() {
  local rc=$?
  for loop in $(losetup -nO NAME -j /var/lib/blocksnap/mnt/disk0 2>/dev/null); do
    for target in $(findmnt -rn -o TARGET --source "$loop"); do umount "$target" || umount -l "$target"; done
    losetup -d "$loop"
    echo "clean-up: the README left $loop attached" >&2
    rc=1
  done
  local pid
  pid=$(timeout 30 "$NODE" "$CLI" status --json 2>/dev/null | "$NODE" -e 'let t="";process.stdin.on("data",(d)=>t+=d).on("end",()=>{try{console.log(JSON.parse(t).pid)}catch{}})')
  if [ -n "$pid" ]; then kill -TERM "$pid"; fi
  for _ in $(seq 600); do kill -0 "$SERVE" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$SERVE" 2>/dev/null && { echo "clean-up: the daemon did not stop" >&2; kill -KILL "$SERVE"; rc=1; }
  wait "$SERVE"; local serve_rc=$?
  echo "serve exit: $serve_rc"
  [ "$serve_rc" = 0 ] || rc=1
  exit "$rc"
}
trap cleanup EXIT
for _ in $(seq 300); do
  timeout 10 "$NODE" "$CLI" status > /dev/null 2>&1 && break
  kill -0 "$SERVE" 2>/dev/null || { echo "the daemon exited at start" >&2; exit 1; }
  sleep 0.2
done
timeout --kill-after=10 400 bash -eu -o pipefail client.sh
client_rc=$?
echo "client exit: $client_rc"
[ "$client_rc" = 0 ] || exit 1
timeout 60 debugfs -R 'cat /hello.txt' backup.img > hello.out 2>/dev/null
stat -c %s disk0.cbt > cbt.size
`;

void test("the README's quickstart runs as written on a fresh machine", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root (losetup, mount, FUSE)");
  const missing = tools.filter((tool) => which(tool) === undefined);
  if (missing.length > 0) return t.skip(`needs ${missing.join(", ")}`);
  const blocks = quickstartBlocks(await readFile(readmePath, "utf8"));
  const serveIndex = blocks.findIndex((block) => /^npx blocksnap serve(\s|$)/.test(block));
  assert.ok(serveIndex >= 0, "a quickstart block starts with npx blocksnap serve");
  const serveBlock = blocks[serveIndex] as string;
  const clientBlock = blocks[serveIndex + 1];
  assert.ok(clientBlock !== undefined, "the block that drives the daemon follows the serve block");

  const work = join(directory, "work");
  await mkdir(join(work, "bin"), { recursive: true });
  await writeFile(join(work, "serve.sh"), serveBlock);
  await writeFile(join(work, "client.sh"), clientBlock);
  await writeFile(join(work, "run.sh"), orchestrator);
  const shim = join(work, "bin", "npx");
  await writeFile(
    shim,
    '#!/bin/sh\n[ "$1" = blocksnap ] || { echo "npx shim: only blocksnap" >&2; exit 127; }\nshift\nexec "$NODE" "$CLI" "$@"\n',
  );
  await chmod(shim, 0o755);

  const env: NodeJS.ProcessEnv = { ...process.env, WORK: work, NODE: process.execPath, CLI: cliPath };
  delete env.BLOCKSNAP_SOCKET;
  delete env.BLOCKSNAP_STATE_DIR;
  env.PATH = `${join(work, "bin")}:${process.env.PATH ?? ""}`;
  const result = await new Promise<{ code: number | null; output: string }>((resolve) => {
    const child = spawn("unshare", ["--mount", "--propagation", "private", "bash", join(work, "run.sh")], {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.setEncoding("utf8").on("data", (text: string) => {
      output += text;
    });
    child.stderr.setEncoding("utf8").on("data", (text: string) => {
      output += text;
    });
    // SIGTERM first: bash runs its clean-up trap; SIGKILL only if that hangs too.
    const timer = setTimeout(() => child.kill("SIGTERM"), runTimeoutMs);
    const killer = setTimeout(() => child.kill("SIGKILL"), runTimeoutMs + 60_000);
    child.once("close", (code) => {
      clearTimeout(timer);
      clearTimeout(killer);
      resolve({ code, output });
    });
  });
  const serveLog = await readFile(join(work, "serve.log"), "utf8").catch(() => "(no serve.log)");
  assert.equal(result.code, 0, `${result.output}\n--- serve.log:\n${serveLog}`);
  assert.match(result.output, /^client exit: 0$/m);
  assert.match(result.output, /^serve exit: 0$/m);
  assert.equal(
    (await readFile(join(work, "hello.out"), "utf8")).trim(),
    "hello",
    "the backup holds the file",
  );
  const cbtBytes = Number((await readFile(join(work, "cbt.size"), "utf8")).trim());
  assert.ok(cbtBytes > 0, "cbt read wrote the map");
});
