#!/usr/bin/env node
// Runs every benchmark suite from the compiled dist/ tree, one after another (they would disturb each
// other's figures if run together), and leaves their Markdown reports in bench/results/.
// Usage: npm run build && npm run bench [-- core nbd fuse]
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";

const suites = {
  core: "dist/bench/core/run-all.js",
  nbd: "dist/bench/nbd/nbd-bench.js",
  cow: "dist/bench/nbd/cow-bench.js",
  fuse: "dist/bench/fuse/fuse-bench.js",
  supervisor: "dist/bench/supervisor/restart-pause.js",
  journal: "dist/bench/durable/journal-cost.js",
  "snapshot-restore": "dist/bench/durable/snapshot-restore.js",
  s3: "dist/bench/backup/s3-bench.js",
  "backup-local": "dist/bench/backup/local-bench.js",
};
const wanted = process.argv.slice(2);
for (const name of wanted) {
  if (!(name in suites)) {
    console.error(`run-bench: unknown suite ${JSON.stringify(name)}: use ${Object.keys(suites).join(", ")}`);
    process.exit(2);
  }
}
let failed = false;
for (const [name, script] of Object.entries(suites)) {
  if (wanted.length > 0 && !wanted.includes(name)) continue;
  if (!existsSync(script)) {
    console.error(`run-bench: ${script} is missing: run npm run build first`);
    process.exit(1);
  }
  console.log(`== ${name}: node ${script}`);
  const result = spawnSync(process.execPath, [script], { stdio: "inherit" });
  if (result.status !== 0) {
    console.error(`run-bench: ${name} exited with ${result.status}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
