/**
 * PeerUids: the uid of the process at the other end of an accepted Unix socket, from the kernel's
 * SO_PEERCRED (the credentials the client had at connect(); a client cannot claim another uid).
 *
 * Node 20 has no getsockopt(), and native code is not an option here. Scanning /proc (`ss -xp`, or
 * /proc/net/unix plus every /proc/<pid>/fd) costs time in the number of processes and is racy: the peer
 * may have exited, forked or passed its descriptor on, and then the scan names the wrong process or none.
 * So a helper process asks the kernel: `perl -e` with the Socket module of perl-base (Essential: on every
 * Debian/Ubuntu system), in one of two ways:
 *
 * - Resident (tried first): one helper for the server's life takes a copy of the socket's descriptor from
 *   this process with pidfd_getfd(2) (Linux 5.6; allowed to a child of the same uid unless Yama's
 *   ptrace_scope forbids it) and answers each descriptor number written to its stdin with a line. A
 *   connection waits one pipe round trip, not a process start: a perl start costs 30–60 ms here, and it
 *   used to delay every connection's greeting by that (nbdinfo 0.13–0.36 s against nbdkit's 0.04–0.19 s;
 *   nbdcopy opens four connections one after another).
 * - Batch (when the resident helper cannot start or cannot copy descriptors): the sockets are handed to a
 *   short helper as inherited descriptors (fds 3, 4, …); one helper answers a whole batch, while it runs
 *   new sockets wait for the next batch, so at most one runs at a time, each with at most batchSocketsMax
 *   descriptors.
 *
 * Helpers are killed after helperTimeoutMs. A socket whose uid cannot be read (no perl, the socket already
 * closed, a timeout) resolves to undefined and the caller decides (nbd-server.ts: only the global limit
 * applies). The descriptor number asked about stays ours until the answer: the socket is paused and open
 * while it waits (nbd-server.ts), so the number cannot be reused for another socket meanwhile.
 *
 * Locking: none, one event loop.
 */
import { type ChildProcess, spawn } from "node:child_process";
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

/**
 * The resident helper: "ready" once it holds a pidfd of its parent (or "unsupported" and it ends), then
 * for every descriptor number on stdin "fd uid" or "fd -".
 */
const residentScript = [
  "use Socket;",
  "$| = 1;",
  "my $pidfd = syscall(434, getppid(), 0);", // pidfd_open: the same number on every architecture
  'if ($pidfd < 0) { print "unsupported\\n"; exit 0; }',
  // Copying our stderr tells whether pidfd_getfd is allowed here (Yama, seccomp) before any socket asks.
  "my $probe = syscall(438, $pidfd, 2, 0);",
  'if ($probe < 0 && !$!{EBADF}) { print "unsupported\\n"; exit 0; }',
  'if ($probe >= 0 && open(my $p, "+<&=", $probe)) { close($p); }',
  'print "ready\\n";',
  "while (my $line = <STDIN>) {",
  "  chomp $line;",
  "  next unless $line =~ /^\\d{1,9}$/;",
  '  my $uid = "-";',
  "  my $fd = syscall(438, $pidfd, $line + 0, 0);", // pidfd_getfd
  '  if ($fd >= 0 && open(my $s, "+<&=", $fd)) {',
  "    my $c = getsockopt($s, SOL_SOCKET, SO_PEERCRED);",
  '    $uid = (unpack("l3", $c))[1] if defined $c && length($c) >= 12;',
  "    close($s);",
  "  }",
  '  print "$line $uid\\n";',
  "}",
].join("\n");

interface Pending {
  readonly socket: Socket;
  readonly resolve: (uid: number | undefined) => void;
}

type ResidentState = "stopped" | "starting" | "ready" | "unavailable";

/** Times the resident helper may die before the batch helpers take over for good. */
const residentStartsMax = 3;

export class PeerUids {
  private readonly waiting: Pending[] = [];
  private isRunning = false;
  private readonly command: string;
  private readonly onHelperFailure: (message: string) => void;
  private resident: ChildProcess | undefined;
  private residentState: ResidentState = "stopped";
  private residentStarts = 0;
  private residentOutput = "";
  /** Sockets asked of the resident helper, by descriptor number, with their timeouts. */
  private readonly residentAsked = new Map<number, Pending & { readonly timer: NodeJS.Timeout }>();
  /** Sockets waiting for the resident helper's "ready". */
  private residentQueue: Pending[] = [];

  constructor(
    options: {
      readonly command?: string;
      readonly onHelperFailure?: (message: string) => void;
      /** false: only batch helpers (tests of that path). */
      readonly resident?: boolean;
    } = {},
  ) {
    this.command = options.command ?? "perl";
    this.onHelperFailure = options.onHelperFailure ?? (() => {});
    if (options.resident === false) this.residentState = "unavailable";
  }

  /** Which way uids are read now (tests and logs). */
  get mode(): "resident" | "batch" {
    return this.residentState === "unavailable" ? "batch" : "resident";
  }

  /** The peer's uid, or undefined when it cannot be read. Never rejects. */
  uidOf(socket: Socket): Promise<number | undefined> {
    return new Promise((resolve) => {
      const pending = { socket, resolve };
      const fd = descriptorOf(socket);
      if (this.residentState === "unavailable" || fd === undefined || this.residentAsked.has(fd)) {
        this.waiting.push(pending);
        this.runNext();
        return;
      }
      if (this.residentState === "ready") {
        this.askResident(pending, fd);
        return;
      }
      this.residentQueue.push(pending);
      if (this.residentState === "stopped") this.startResident();
    });
  }

  /** Ends the resident helper (the server is closing); sockets still asking get undefined. */
  close(): void {
    this.stopResident("unavailable");
  }

  private startResident(): void {
    this.residentState = "starting";
    this.residentStarts += 1;
    this.residentOutput = "";
    let child: ChildProcess;
    try {
      child = spawn(this.command, ["-e", residentScript], { stdio: ["pipe", "pipe", "ignore"] });
    } catch (error) {
      this.onHelperFailure(`cannot start ${this.command}: ${(error as Error).message}`);
      this.stopResident("unavailable");
      return;
    }
    this.resident = child;
    child.unref();
    (child.stdin as unknown as Socket | null)?.unref?.();
    (child.stdout as unknown as Socket | null)?.unref?.();
    child.stdin?.on("error", () => {});
    child.stdout?.setEncoding("utf8").on("data", (text: string) => this.onResidentOutput(child, text));
    child.once("error", (error) => {
      if (this.resident !== child) return;
      this.onHelperFailure(`cannot run ${this.command}: ${error.message}`);
      this.stopResident("unavailable");
    });
    child.once("close", () => {
      if (this.resident !== child) return;
      this.stopResident(this.residentStarts >= residentStartsMax ? "unavailable" : "stopped");
    });
  }

  private onResidentOutput(child: ChildProcess, text: string): void {
    if (this.resident !== child) return;
    this.residentOutput += text;
    if (this.residentOutput.length > helperOutputBytesMax) {
      this.stopResident("unavailable");
      return;
    }
    for (;;) {
      const end = this.residentOutput.indexOf("\n");
      if (end < 0) return;
      const line = this.residentOutput.slice(0, end);
      this.residentOutput = this.residentOutput.slice(end + 1);
      if (line === "ready" && this.residentState === "starting") {
        this.residentState = "ready";
        const queued = this.residentQueue;
        this.residentQueue = [];
        for (const pending of queued) {
          const fd = descriptorOf(pending.socket);
          if (fd === undefined || this.residentAsked.has(fd)) this.waiting.push(pending);
          else this.askResident(pending, fd);
        }
        this.runNext();
        continue;
      }
      if (line === "unsupported") {
        this.stopResident("unavailable");
        return;
      }
      const match = /^(\d{1,9}) (\d{1,10}|-)$/.exec(line);
      const asked = match ? this.residentAsked.get(Number(match[1])) : undefined;
      if (match === null || asked === undefined) continue;
      this.residentAsked.delete(Number(match[1]));
      clearTimeout(asked.timer);
      const uid = match[2] === "-" ? undefined : Number(match[2]);
      asked.resolve(uid !== undefined && Number.isSafeInteger(uid) ? uid : undefined);
    }
  }

  private askResident(pending: Pending, fd: number): void {
    if (pending.socket.destroyed) {
      pending.resolve(undefined);
      return;
    }
    const timer = setTimeout(() => {
      this.onHelperFailure(`${this.command} did not answer within ${helperTimeoutMs} ms`);
      this.stopResident("stopped");
    }, helperTimeoutMs);
    timer.unref();
    this.residentAsked.set(fd, { ...pending, timer });
    this.resident?.stdin?.write(`${fd}\n`);
  }

  /**
   * Ends the resident helper. Sockets it had not answered get undefined (a helper that died mid-answer
   * may have been asked a number the socket no longer holds); those still waiting for it go to the batch
   * helpers when it will not come back, or to its next start.
   */
  private stopResident(next: ResidentState): void {
    const child = this.resident;
    this.resident = undefined;
    if (child !== undefined && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    this.residentState = next;
    for (const asked of this.residentAsked.values()) {
      clearTimeout(asked.timer);
      asked.resolve(undefined);
    }
    this.residentAsked.clear();
    const queued = this.residentQueue;
    this.residentQueue = [];
    if (queued.length === 0) return;
    if (next === "stopped") {
      this.residentQueue = queued;
      this.startResident();
      return;
    }
    this.waiting.push(...queued);
    this.runNext();
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

/** The descriptor number of an accepted socket (libuv's handle), undefined when it has none. */
function descriptorOf(socket: Socket): number | undefined {
  const fd = (socket as unknown as { readonly _handle?: { readonly fd?: unknown } })._handle?.fd;
  return typeof fd === "number" && Number.isInteger(fd) && fd >= 0 ? fd : undefined;
}
