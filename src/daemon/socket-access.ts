/**
 * Who may connect to the daemon. The control socket and the NBD Unix socket are the daemon user's only
 * (0600) unless `--socket-group` opens both to one group (0660, and the state directory 0710 to that group
 * so its members can reach them). A socket file is created under a umask that already gives its final mode,
 * so there is no window in which a wider mode exists.
 *
 * TCP is off unless asked for. A plaintext TCP listener on a loopback address is allowed with a warning
 * (every local user can use every export); on any other address it is refused unless
 * `--insecure-no-tls` is given, and then warned about at every start.
 *
 * Not done here: TLS and per-identity access rules (the NBD face's job).
 */
import { execFileSync } from "node:child_process";
import { chmod, chown } from "node:fs/promises";
import { isIP } from "node:net";
import { userInfo } from "node:os";
import { BlockError } from "../block/errors.js";

export interface SocketGroup {
  readonly gid: number;
  readonly name: string;
}

/** The mode and group of the daemon's Unix sockets. */
export interface SocketAccess {
  readonly group: SocketGroup | null;
}

const socketModeOwnerOnly = 0o600;
const socketModeGroup = 0o660;
const stateDirModeGroup = 0o710;
const groupNamePattern = /^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$/;

export function socketMode(access: SocketAccess): number {
  return access.group === null ? socketModeOwnerOnly : socketModeGroup;
}

/** A group name or a numeric gid, as `--socket-group` takes it. Unknown names are an EINVAL. */
export function resolveSocketGroup(text: string): SocketGroup {
  if (/^\d{1,10}$/.test(text)) {
    const gid = Number(text);
    return { gid, name: groupNameOf(gid) ?? text };
  }
  if (!groupNamePattern.test(text)) {
    throw new BlockError("EINVAL", `--socket-group: ${JSON.stringify(text)} is not a group name`);
  }
  const entry = getentGroup(text);
  if (entry === null) throw new BlockError("EINVAL", `--socket-group: no group named ${text}`);
  return entry;
}

/**
 * Runs `listen` (which creates the socket file synchronously) under a umask that gives the socket its
 * final permission bits, then sets owner group and mode explicitly (the umask cannot add a group).
 */
export async function listenRestricted(
  socketPath: string,
  access: SocketAccess,
  listen: () => Promise<void>,
): Promise<void> {
  const umaskPrevious = process.umask(0o777 & ~socketMode(access));
  let listening: Promise<void>;
  try {
    listening = listen();
  } finally {
    process.umask(umaskPrevious);
  }
  await listening;
  await applySocketAccess(socketPath, access);
}

export async function applySocketAccess(socketPath: string, access: SocketAccess): Promise<void> {
  if (access.group !== null) await chown(socketPath, -1, access.group.gid);
  await chmod(socketPath, socketMode(access));
}

/** With a socket group its members must be able to traverse (not list) the state directory. */
export async function applyStateDirAccess(stateDir: string, access: SocketAccess): Promise<void> {
  if (access.group === null) return;
  await chown(stateDir, -1, access.group.gid);
  await chmod(stateDir, stateDirModeGroup);
}

/** True for 127.0.0.0/8, ::1, ::ffff:127.x and `localhost`: only this machine can connect. */
export function isLoopbackHost(host: string): boolean {
  if (host === "localhost") return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  if (isIP(host) === 6) {
    const lower = host.toLowerCase();
    return lower === "::1" || lower === "0:0:0:0:0:0:0:1" || lower.startsWith("::ffff:127.");
  }
  return false;
}

/**
 * Decides whether a plaintext TCP listener may start. Returns the warning to log at every start; throws
 * EACCES when the listener would be open to the network without `--insecure-no-tls`.
 */
export function plaintextTcpWarning(
  address: { readonly host: string; readonly port: number },
  insecureNoTls: boolean,
): string {
  const where = `${address.host}:${address.port}`;
  if (isLoopbackHost(address.host)) {
    return `NBD on ${where} without TLS: every local user can read and write every export`;
  }
  if (!insecureNoTls) {
    throw new BlockError(
      "EACCES",
      `refusing to serve NBD on ${where} without TLS: anyone who can reach it could read and write every export (use a loopback address, or --insecure-no-tls to accept that)`,
    );
  }
  return `NBD on ${where} without TLS (--insecure-no-tls): every host that can reach it can read and write every export`;
}

/**
 * The lines `status` shows under "who can connect", face by face: who reaches each socket, what TLS asks
 * of NBD clients there (the same on every NBD listener), and which exports they may then use.
 */
export function describeAccess(options: {
  readonly access: SocketAccess;
  readonly nbdSocketPath: string | null;
  readonly nbdActivation: boolean;
  readonly nbdTcp: { readonly host: string; readonly port: number } | null;
  /** NBD over TLS; absent: off. */
  readonly tls?: { readonly mode: "off" | "on" | "require"; readonly credentials: readonly string[] };
  /** The access file (serve --access); absent or null: every export to every client that gets in. */
  readonly accessFile?: string | null;
}): string[] {
  const user = currentUserName();
  const who =
    options.access.group === null
      ? `user ${user} only (mode 0600)`
      : `user ${user} and group ${options.access.group.name} (mode 0660)`;
  const tls = options.tls ?? { mode: "off", credentials: [] };
  const credentials = tls.credentials.map((kind) => (kind === "x509" ? "X.509" : "PSK")).join(" or ");
  const tlsNote =
    tls.mode === "require"
      ? `, TLS required (${credentials})`
      : tls.mode === "on"
        ? `, TLS offered (${credentials}), plain text allowed`
        : "";
  const lines = [`control socket: ${who}`];
  if (options.nbdSocketPath !== null) lines.push(`nbd unix socket: ${who}${tlsNote}`);
  if (options.nbdActivation) {
    lines.push(`nbd activation socket: as its systemd .socket unit sets it${tlsNote}`);
  }
  if (options.nbdTcp !== null) {
    const reach = isLoopbackHost(options.nbdTcp.host) ? "every local user" : "every host that can reach it";
    lines.push(`nbd tcp: ${reach}${tls.mode === "off" ? ", no TLS" : tlsNote}`);
  }
  const hasNbd = options.nbdSocketPath !== null || options.nbdActivation || options.nbdTcp !== null;
  if (hasNbd) {
    const accessFile = options.accessFile ?? null;
    lines.push(
      accessFile === null
        ? "nbd exports: every export, read-write, to every client that gets in"
        : `nbd exports: as the access rules in ${accessFile} grant`,
    );
  }
  return lines;
}

function currentUserName(): string {
  try {
    return userInfo().username;
  } catch {
    return String(process.getuid?.() ?? "?");
  }
}

function getentGroup(name: string): SocketGroup | null {
  const line = getent(name);
  if (line === null) return null;
  const [groupName, , gidText] = line.split(":");
  const gid = Number(gidText);
  if (groupName === undefined || !Number.isSafeInteger(gid)) return null;
  return { gid, name: groupName };
}

function groupNameOf(gid: number): string | null {
  return getent(String(gid))?.split(":")[0] ?? null;
}

/** `getent group KEY` (the name service switch, so LDAP and systemd-userdb groups work too). */
function getent(key: string): string | null {
  try {
    const line = execFileSync("getent", ["group", key], { encoding: "utf8", timeout: 5000 }).trim();
    return line === "" ? null : (line.split("\n")[0] ?? null);
  } catch {
    return null;
  }
}
