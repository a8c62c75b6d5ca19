/**
 * CBT across a clean restart. At a clean stop each device's whole CBT state (both maps, the generation,
 * the snap numbers) is written to `<state>/cbt/<device>.cbt` (cbt-state-codec.ts: checksummed, replaced
 * atomically) with the backend's identity at that moment. At the next start the state is taken back only
 * if it can be trusted — the file is intact and the backend is the same and was not modified meanwhile
 * (regular file: device, inode, size and modification time; block device: its device number) — and the
 * generation goes on; otherwise the device starts a new generation whose reason says why.
 *
 * The file is removed as soon as it is loaded: while the daemon runs there is no saved state, so after a
 * crash (kill -9, power loss) the next start finds none and starts a new generation ("untrusted: no state
 * saved at a clean stop") instead of trusting a map that misses the writes made since. A crash therefore
 * costs a full backup, never a missed block. What this does not do yet: keep the generation across a crash
 * (that needs a write-ahead record of dirty regions before each first write).
 *
 * `memory:` devices come back empty, so they always start a new generation.
 */
import { mkdir, readFile, rm, stat } from "node:fs/promises";
import { dirname } from "node:path";
import { toBlockError } from "../block/errors.js";
import type { CbtState } from "../cbt/cbt-map.js";
import { type BackendIdentity, decodeCbtState, encodeCbtState } from "../cbt/cbt-state-codec.js";
import { memoryBackendPath } from "../engine/engine.js";
import { writeFileAtomic } from "./atomic-write.js";
import { cbtStatePathIn } from "./paths.js";

export type LoadedCbt = { readonly cbtState: CbtState } | { readonly cbtGenerationReason: string };

/** The identity of a backend now; null for `memory:` (nothing to compare, nothing to keep). */
async function backendIdentity(backendPath: string): Promise<BackendIdentity | null> {
  if (backendPath === memoryBackendPath) return null;
  const stats = await stat(backendPath, { bigint: true });
  if (stats.isBlockDevice()) return { kind: "block-device", rdev: stats.rdev.toString() };
  return {
    kind: "file",
    dev: stats.dev.toString(),
    ino: stats.ino.toString(),
    size: stats.size.toString(),
    mtimeNs: stats.mtimeNs.toString(),
  };
}

function sameIdentity(saved: BackendIdentity, now: BackendIdentity): string | null {
  const keys = new Set([...Object.keys(saved), ...Object.keys(now)]);
  for (const key of keys) {
    if (saved[key] !== now[key]) {
      if (key === "mtimeNs" || key === "size")
        return "the backend was modified while blocksnap was not serving it";
      return "the backend is not the same file or device";
    }
  }
  return null;
}

/** Loads and removes the saved state of one device; never throws (an unusable state is a reason). */
export async function takeSavedCbt(stateDir: string, name: string, backendPath: string): Promise<LoadedCbt> {
  if (backendPath === memoryBackendPath) {
    return { cbtGenerationReason: "untrusted: memory: devices come back empty" };
  }
  const path = cbtStatePathIn(stateDir, name);
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      return {
        cbtGenerationReason: "untrusted: no state saved at a clean stop (the daemon crashed or was killed)",
      };
    }
    return { cbtGenerationReason: `untrusted: cannot read the saved state: ${(error as Error).message}` };
  }
  // Gone before anything is trusted: a crash from here on must not find a stale map.
  await rm(path, { force: true });
  try {
    const saved = decodeCbtState(bytes);
    const now = await backendIdentity(backendPath);
    const changed = now === null ? "no backend identity" : sameIdentity(saved.backendIdentity, now);
    if (changed !== null) return { cbtGenerationReason: `untrusted: ${changed}` };
    return { cbtState: saved.state };
  } catch (error) {
    return { cbtGenerationReason: `untrusted: ${toBlockError(error, "saved state").message}` };
  }
}

/** Saves one device's state at a clean stop (after the faces stopped, so no write can follow). */
export async function saveCbt(
  stateDir: string,
  name: string,
  backendPath: string,
  state: CbtState,
  options: { readonly durable?: boolean } = {},
): Promise<void> {
  const identity = await backendIdentity(backendPath);
  if (identity === null) return;
  const path = cbtStatePathIn(stateDir, name);
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  await writeFileAtomic(path, encodeCbtState({ state, backendIdentity: identity }), 0o600, options);
}

export async function forgetSavedCbt(stateDir: string, name: string): Promise<void> {
  await rm(cbtStatePathIn(stateDir, name), { force: true });
}
