/**
 * The messages between the supervisor and its engine child over the Node IPC channel
 * (child_process fork-style 'ipc' stdio). Accepted sockets travel as the message's handle.
 */

/** The child's environment variable that makes `blocksnap serve` an engine; its value is the supervisor's pid. */
export const engineEnvironmentKey = "BLOCKSNAP_ENGINE_OF";
/** Where the engine finds the inherited /dev/fuse descriptor (stdio index). */
export const engineFuseFd = 4;

export type ListenerKind = "control" | "nbd";

export interface EngineRestartRecord {
  readonly at: string;
  readonly cause: string;
}

/** Supervisor → engine. */
export type SupervisorMessage =
  | {
      readonly kind: "hello";
      /** True when the FUSE connection was set up by an earlier engine (no mount, no INIT: resume). */
      readonly resumeFuse: boolean;
      readonly fuseFd: number | null;
      /** The TCP address the supervisor listens on for NBD (port 0 resolved). */
      readonly nbdTcp: { readonly host: string; readonly port: number } | null;
      readonly supervisorPid: number;
      readonly engineNumber: number;
      readonly restarts: readonly EngineRestartRecord[];
    }
  | { readonly kind: "connection"; readonly listener: ListenerKind }
  /** To the running engine, once its successor is loaded: begin the planned hand-over now. */
  | { readonly kind: "hand-over-now" };

/** Engine → supervisor. */
export type EngineMessage =
  /** A standby engine has loaded its code and waits for its hello. */
  | { readonly kind: "loaded" }
  | { readonly kind: "ready" }
  /** POST /v1/restart was accepted: load a successor, then send "hand-over-now". */
  | { readonly kind: "restart-requested" }
  /** A planned restart begins: keep new connections queued. */
  | { readonly kind: "handover" }
  /**
   * The engine has saved everything and ends itself with SIGKILL: a clean exit would wait forever for the
   * FUSE reader thread, which sits in read(2) on /dev/fuse that only the next engine will answer.
   */
  | { readonly kind: "handed-over" }
  /** The saved FUSE session could not be taken over: the next engine needs a fresh connection. */
  | { readonly kind: "resume-failed"; readonly reason: string };
