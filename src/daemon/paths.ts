/**
 * Where the daemon keeps its files. One state directory holds everything: the control socket, the NBD
 * socket, the FUSE mount point, the lock file and the device registry, so `--state-dir` alone moves a
 * daemon (and lets tests run many daemons side by side). The CLI uses the same rules to find the socket.
 */
import { homedir } from "node:os";
import { join } from "node:path";

export interface StateDirEnvironment {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly isRoot: boolean;
}

export function currentStateDirEnvironment(): StateDirEnvironment {
  return { env: process.env, isRoot: process.getuid?.() === 0 };
}

/** `--state-dir`, else BLOCKSNAP_STATE_DIR, else /var/lib/blocksnap (root) or the XDG state directory. */
export function resolveStateDir(
  explicitStateDir: string | undefined,
  environment: StateDirEnvironment,
): string {
  if (explicitStateDir !== undefined && explicitStateDir !== "") return explicitStateDir;
  const fromEnv = environment.env.BLOCKSNAP_STATE_DIR;
  if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  if (environment.isRoot) return "/var/lib/blocksnap";
  const xdgStateHome = environment.env.XDG_STATE_HOME;
  if (xdgStateHome !== undefined && xdgStateHome !== "") return join(xdgStateHome, "blocksnap");
  return join(environment.env.HOME ?? homedir(), ".local", "state", "blocksnap");
}

export function controlSocketPathIn(stateDir: string): string {
  return join(stateDir, "blocksnap.sock");
}

export function nbdSocketPathIn(stateDir: string): string {
  return join(stateDir, "nbd.sock");
}

export function fuseMountDirIn(stateDir: string): string {
  return join(stateDir, "mnt");
}

export function lockFilePathIn(stateDir: string): string {
  return join(stateDir, "blocksnap.lock");
}

export function deviceRegistryPathIn(stateDir: string): string {
  return join(stateDir, "devices.json");
}

/** A device's CBT checkpoint: its exact maps at a clean stop, its last checkpoint while running (cbt-keeper.ts). */
export function cbtStatePathIn(stateDir: string, deviceName: string): string {
  return join(stateDir, "cbt", `${deviceName}.cbt`);
}

/** The CBT write-intent journal of a device (src/persist/region-journal.ts). */
export function cbtJournalPathIn(stateDir: string, deviceName: string): string {
  return join(stateDir, "cbt", `${deviceName}.journal`);
}

/** What a supervised engine leaves for its successor to resume the FUSE session (fuse-session-state.ts). */
export function fuseSessionStatePathIn(stateDir: string): string {
  return join(stateDir, "fuse-session.json");
}
