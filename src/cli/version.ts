/**
 * The package version, read from the package.json above this file: dist/src/cli/ when built, src/cli/
 * when run from source, so the number has one home (package.json) and cannot drift.
 */
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const searchLevelsMax = 5;
let cachedVersion: string | undefined;

export function packageVersion(): string {
  if (cachedVersion !== undefined) return cachedVersion;
  let directory = dirname(fileURLToPath(import.meta.url));
  for (let level = 0; level < searchLevelsMax; level++) {
    try {
      const parsed = JSON.parse(readFileSync(join(directory, "package.json"), "utf8")) as {
        name?: unknown;
        version?: unknown;
      };
      if (parsed.name === "blocksnap" && typeof parsed.version === "string") {
        cachedVersion = parsed.version;
        return cachedVersion;
      }
    } catch {
      // No package.json at this level: keep climbing.
    }
    directory = dirname(directory);
  }
  cachedVersion = "unknown";
  return cachedVersion;
}
