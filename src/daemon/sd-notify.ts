/**
 * sd_notify(3) for the daemon: READY=1 once every face is up, STATUS= lines while it waits, STOPPING=1 when
 * a stop begins — what a `Type=notify` unit waits for. Node has no AF_UNIX datagram sockets, so each message
 * goes through systemd's own `systemd-notify --pid=<our pid>`; the unit sets `NotifyAccess=all` because the
 * sender is that short-lived child. Without NOTIFY_SOCKET (not started by systemd) every call is a no-op.
 *
 * Messages are sent one at a time, in order; at most `pendingMax` wait, and beyond that new STATUS-only
 * messages are dropped (a stuck systemd-notify must not grow memory). A failed send is logged once at warn
 * and never fails the daemon: readiness reporting is a courtesy to the service manager, not a data path.
 */
import { spawn } from "node:child_process";
import type { Logger } from "../util/logger.js";

const pendingMax = 16;
const sendTimeoutMs = 5_000;

export type NotifyFields = Readonly<Record<string, string>>;

export class SdNotifier {
  private readonly notifySocket: string | null;
  private readonly mainPid: number;
  private readonly logger: Logger;
  private tail: Promise<void> = Promise.resolve();
  private pendingCount = 0;
  private warned = false;

  /** `mainPid`: the service's main process when that is not us (a supervised engine names its supervisor). */
  constructor(environment: NodeJS.ProcessEnv, logger: Logger, mainPid: number = process.pid) {
    this.mainPid = mainPid;
    const socket = environment.NOTIFY_SOCKET;
    this.notifySocket = socket === undefined || socket === "" ? null : socket;
    this.logger = logger;
  }

  get enabled(): boolean {
    return this.notifySocket !== null;
  }

  /** Queues one message; resolves when it was handed to systemd-notify (or dropped). */
  notify(fields: NotifyFields): Promise<void> {
    if (this.notifySocket === null) return Promise.resolve();
    const statusOnly = Object.keys(fields).every((key) => key === "STATUS");
    if (this.pendingCount >= pendingMax && statusOnly) return Promise.resolve();
    this.pendingCount++;
    const assignments = Object.entries(fields).map(([key, value]) => `${key}=${oneLine(value)}`);
    this.tail = this.tail.then(() =>
      this.send(assignments).finally(() => {
        this.pendingCount--;
      }),
    );
    return this.tail;
  }

  private send(assignments: readonly string[]): Promise<void> {
    return new Promise((resolve) => {
      const child = spawn("systemd-notify", [`--pid=${this.mainPid}`, ...assignments], {
        stdio: ["ignore", "ignore", "pipe"],
        env: { ...process.env, NOTIFY_SOCKET: this.notifySocket ?? "" },
      });
      let stderr = "";
      child.stderr.setEncoding("utf8").on("data", (text: string) => {
        if (stderr.length < 1024) stderr += text;
      });
      const timer = setTimeout(() => child.kill("SIGKILL"), sendTimeoutMs);
      const done = (problem: string | null): void => {
        clearTimeout(timer);
        if (problem !== null && !this.warned) {
          this.warned = true;
          this.logger.warn(
            { err: problem },
            "systemd-notify failed; the service manager may not see our state",
          );
        }
        resolve();
      };
      child.once("error", (error) => done(error.message));
      child.once("close", (code) => done(code === 0 ? null : `exit ${code}: ${stderr.trim()}`));
    });
  }
}

/** sd_notify fields are newline-separated: a value must stay on one line. */
function oneLine(value: string): string {
  return value.replace(/[\r\n]+/g, " ");
}
