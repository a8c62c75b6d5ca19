#!/usr/bin/env node
// Runs every compiled test file with Node's test runner. Node 20's --test does not expand globs, so the
// files are listed here. BLOCKSNAP_TEST_FILTER=substring narrows the run to matching paths.
import { spawnSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { join } from "node:path";

function collect(directory, found) {
  let entries;
  try {
    entries = readdirSync(directory);
  } catch {
    return found;
  }
  for (const entry of entries) {
    const path = join(directory, entry);
    if (statSync(path).isDirectory()) collect(path, found);
    else if (entry.endsWith(".test.js")) found.push(path);
  }
  return found;
}

const filter = process.env.BLOCKSNAP_TEST_FILTER ?? "";
const files = [...collect("dist/src", []), ...collect("dist/test", [])]
  .filter((path) => path.includes(filter))
  .sort();
if (files.length === 0) {
  console.error("run-tests: no test files found under dist/ (did tsc run?)");
  process.exit(1);
}
const result = spawnSync(
  process.execPath,
  ["--test", "--test-concurrency=2", "--test-timeout=600000", ...files],
  { stdio: "inherit" },
);
process.exit(result.status ?? 1);
