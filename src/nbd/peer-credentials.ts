/**
 * PeerUids: the uid of the process at the other end of an accepted Unix socket, from the kernel's
 * SO_PEERCRED (the credentials the client had at connect(); a client cannot claim another uid).
 *
 * Node 20 has no getsockopt(), and native code is not an option here. Scanning /proc (`ss -xp`, or
 * /proc/net/unix plus every /proc/<pid>/fd) costs time in the number of processes and is racy: the peer
 * may have exited, forked or passed its descriptor on, and then the scan names the wrong process or none.
 * So the socket itself is handed to a short helper process as an inherited descriptor, and the helper asks
 * the kernel: `perl -e` with the Socket module of perl-base (Essential: on every Debian/Ubuntu system). One
 * helper answers a whole batch of sockets (fds 3, 4, …); while it runs, new sockets wait for the next batch,
 * so at most one helper runs at a time, each with at most batchSocketsMax descriptors, killed after
 * helperTimeoutMs. A socket whose uid cannot be read (no perl, the socket already closed, a timeout)
 * resolves to undefined and the caller decides (nbd-server.ts: only the global limit applies).
 *
 * Locking: none, one event loop.
 */
import { spawn } from "node:child_process";
import type { Socket } from "node:net";

const batchSocketsMax = 32;
const helperTimeoutMs = 5_000;
const helperOutputBytesMax = 64 * 1024;
const firstSocketFd = 3;

/** For every fd in @ARGV: "fd uid" or "fd -" when the kernel would not say. */
const helperScript = [
  "use Socket;",
  "for my $fd (@ARGV) {",
  '  my $uid = "-";',
  '  if (open(my $s, "+<&=", $fd)) {',
  "    my $c = getsockopt($s, SOL_SOCKET, SO_PEERCRED);",
  '    $uid = (unpack("l3", $c))[1] if defined $c && length($c) >= 12;',
  "  }",
  '  print "$fd $uid\\n";',
  "}",
].join("\n");

interface Pending {
  readonly socket: Socket;
  readonly resolve: (uid: number | undefined) => void;
}

export class PeerUids {
  private readonly waiting: Pending[] = [];
  private isRunning = false;
  private readonly command: string;
  private readonly onHelperFailure: (message: string) => void;

  constructor(
    options: { readonly command?: string; readonly onHelperFailure?: (message: string) => void } = {},
  ) {
    this.command = options.command ?? "perl";
    this.onHelperFailure = options.onHelperFailure ?? (() => {});
  }

  /** The peer's uid, or undefined when it cannot be read. Never rejects. */
  uidOf(socket: Socket): Promise<number | undefined> {
    return new Promise((resolve) => {
      this.waiting.push({ socket, resolve });
      this.runNext();
    });
  }

  private runNext(): void {
    if (this.isRunning || this.waiting.length === 0) return;
    const batch = this.waiting.splice(0, batchSocketsMax);
    const live = batch.filter((entry) => !entry.socket.destroyed);
    for (const entry of batch) if (entry.socket.destroyed) entry.resolve(undefined);
    if (live.length === 0) {
      this.runNext();
      return;
    }
    this.isRunning = true;
    void this.runHelper(live).then((uids) => {
      for (let index = 0; index < live.length; index += 1) live[index]!.resolve(uids[index]);
      this.isRunning = false;
      this.runNext();
    });
  }

  private runHelper(batch: readonly Pending[]): Promise<Array<number | undefined>> {
    const fds = batch.map((_, index) => String(firstSocketFd + index));
    const unknown = batch.map(() => undefined);
    return new Promise((resolve) => {
      let child: ReturnType<typeof spawn>;
      try {
        child = spawn(this.command, ["-e", helperScript, ...fds], {
          stdio: ["ignore", "pipe", "ignore", ...batch.map((entry) => entry.socket)],
        });
      } catch (error) {
        this.onHelperFailure(`cannot start ${this.command}: ${(error as Error).message}`);
        resolve(unknown);
        return;
      }
      let output = "";
      child.stdout?.setEncoding("utf8").on("data", (text: string) => {
        if (output.length < helperOutputBytesMax) output += text;
      });
      const timer = setTimeout(() => child.kill("SIGKILL"), helperTimeoutMs);
      child.once("error", (error) => {
        clearTimeout(timer);
        this.onHelperFailure(`cannot run ${this.command}: ${error.message}`);
        resolve(unknown);
      });
      child.once("close", (code, signal) => {
        clearTimeout(timer);
        if (code !== 0) this.onHelperFailure(`${this.command} ended with ${code ?? signal}`);
        resolve(batch.map((_, index) => uidInOutput(output, firstSocketFd + index)));
      });
    });
  }
}

function uidInOutput(output: string, fd: number): number | undefined {
  const match = new RegExp(`^${fd} (\\d{1,10})$`, "m").exec(output);
  if (match === null) return undefined;
  const uid = Number(match[1]);
  return Number.isSafeInteger(uid) ? uid : undefined;
}
