/**
 * The systemd units for blocksnap, rendered for this installation (the node binary and the CLI script
 * that are running now): `blocksnap.service` (Type=notify; the daemon sends READY/STATUS/STOPPING through
 * sd-notify.ts) and `blocksnap.socket` (an NBD Unix socket handed over by socket activation).
 *
 * Hardening keeps only what the daemon needs: CAP_SYS_ADMIN (the FUSE mount, FIFREEZE/FITHAW, loop
 * devices), CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (backends and storages owned by other users),
 * CAP_CHOWN and CAP_FOWNER (giving the sockets to --socket-group). ProtectSystem=full, not strict, because
 * backends and storages live wherever the admin puts them (/var/lib/images, /srv, block devices); /usr,
 * /boot and /etc are read-only. No MemoryDenyWriteExecute: V8's JIT needs writable executable memory.
 *
 * The stop timeout is longer than the daemon's own wait for mounted file systems (serve --stop-wait), so
 * systemd's SIGKILL never interrupts the clean stop that keeps a mounted file system's writes.
 */

export interface UnitOptions {
  /** Absolute path of the node binary. */
  readonly nodePath: string;
  /** Absolute path of dist/src/cli/main.js. */
  readonly cliPath: string;
  /** Extra `serve` arguments, already split. */
  readonly serveArgs: readonly string[];
  /** Seconds the daemon waits for mounted file systems at stop (serve --stop-wait). */
  readonly stopWaitSeconds: number;
}

export const serviceUnitName = "blocksnap.service";
export const socketUnitName = "blocksnap.socket";
export const activationSocketPath = "/run/blocksnap/nbd-activated.sock";

export function renderServiceUnit(options: UnitOptions): string {
  const execStart = [options.nodePath, options.cliPath, "serve", "--supervise", ...options.serveArgs]
    .map(quoteUnitWord)
    .join(" ");
  return `[Unit]
Description=blocksnap: snapshots and change tracking of live block devices (NBD, FUSE)
After=local-fs.target network.target
Wants=${socketUnitName}
After=${socketUnitName}

[Service]
Type=notify
NotifyAccess=all
ExecStart=${execStart}
Restart=on-failure
RestartSec=2
TimeoutStopSec=${options.stopWaitSeconds + 60}
KillMode=mixed
StateDirectory=blocksnap
StateDirectoryMode=0700
LimitNOFILE=65536
ProtectSystem=full
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_CHOWN CAP_FOWNER

[Install]
WantedBy=multi-user.target
`;
}

export function renderSocketUnit(): string {
  return `[Unit]
Description=blocksnap NBD socket (socket activation; only root may connect)

[Socket]
ListenStream=${activationSocketPath}
SocketMode=0600
DirectoryMode=0755
Service=${serviceUnitName}

[Install]
WantedBy=sockets.target
`;
}

/** systemd splits ExecStart on spaces and reads quotes and backslashes: quote what needs it. */
function quoteUnitWord(word: string): string {
  if (/^[A-Za-z0-9_@+=:,./-]+$/.test(word)) return word;
  return `"${word.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\$/g, "$$$$").replace(/%/g, "%%")}"`;
}
