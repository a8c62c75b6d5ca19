/**
 * The engine's side of the supervisor link (supervisor.ts): the hello that says how to start (resume the
 * FUSE session or mount it, which TCP address the supervisor listens on), the accepted sockets the
 * supervisor passes over (each handed to the face it belongs to), and the messages back: ready, and the
 * start of a planned hand-over. When the channel closes (the supervisor died), the engine stops as at
 * SIGTERM: nothing would pass it new connections, and its FUSE mount would outlive a supervisor restart.
 */
import type * as net from "node:net";
import {
  type EngineMessage,
  engineEnvironmentKey,
  type ListenerKind,
  type SupervisorMessage,
} from "./supervisor-protocol.js";

/** What the supervisor's hello says (supervisor-protocol.ts). */
export type EngineHello = Omit<Extract<SupervisorMessage, { kind: "hello" }>, "kind">;

export class EngineLink {
  readonly hello: EngineHello;
  private readonly handlers = new Map<ListenerKind, (socket: net.Socket) => void>();

  private constructor(hello: EngineHello) {
    this.hello = hello;
    process.on("message", (message: SupervisorMessage, handle: unknown) => {
      if (message?.kind !== "connection") return;
      const socket = handle as net.Socket | undefined;
      if (!socket) return;
      const handler = this.handlers.get(message.listener);
      if (handler) handler(socket);
      else socket.destroy();
    });
    process.once("disconnect", () => {
      process.kill(process.pid, "SIGTERM");
    });
  }

  /**
   * The link when this process is a supervised engine (started by supervisor.ts), else null. An engine
   * starts as a standby: it says "loaded" and waits, without a deadline, for the hello that makes it the
   * engine (the supervisor keeps one ready so that a restart does not wait for Node to boot). If the
   * supervisor goes away meanwhile, the standby exits.
   */
  static async fromEnvironment(): Promise<EngineLink | null> {
    if (process.env[engineEnvironmentKey] === undefined || typeof process.send !== "function") return null;
    const exitWithSupervisor = () => process.exit(0);
    process.once("disconnect", exitWithSupervisor);
    const hello = await new Promise<EngineHello>((resolve) => {
      const onMessage = (message: SupervisorMessage) => {
        if (message?.kind !== "hello") return;
        process.off("message", onMessage);
        resolve(message);
      };
      process.on("message", onMessage);
      process.send?.({ kind: "loaded" } satisfies EngineMessage);
    });
    process.off("disconnect", exitWithSupervisor);
    return new EngineLink(hello);
  }

  /** Connections accepted on the supervisor's `kind` listeners go to `handler` from now on. */
  onConnection(kind: ListenerKind, handler: (socket: net.Socket) => void): void {
    this.handlers.set(kind, handler);
  }

  ready(): void {
    this.send({ kind: "ready" });
  }

  /**
   * A planned restart: the supervisor loads a successor and then calls `handOver` (its "hand-over-now"),
   * so the pause the clients see does not include Node's boot.
   */
  requestRestart(handOver: () => void): void {
    const onMessage = (message: SupervisorMessage) => {
      if (message?.kind !== "hand-over-now") return;
      process.off("message", onMessage);
      handOver();
    };
    process.on("message", onMessage);
    this.send({ kind: "restart-requested" });
  }

  beginHandover(): void {
    this.send({ kind: "handover" });
  }

  /** Resuming the FUSE session failed: the supervisor gives the next engine a fresh connection. */
  resumeFailed(reason: string): void {
    this.send({ kind: "resume-failed", reason });
  }

  /** Everything is saved: tells the supervisor, then ends this process (see "handed-over"). */
  endHandedOver(): void {
    process.send?.({ kind: "handed-over" } satisfies EngineMessage, () => {
      process.kill(process.pid, "SIGKILL");
    });
  }

  private send(message: EngineMessage): void {
    process.send?.(message);
  }
}
