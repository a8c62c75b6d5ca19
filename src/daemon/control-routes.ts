/**
 * The control API's routes (docs/api.md): one table mapping method + path pattern to a handler. Handlers
 * validate their input with the zod schemas of api-schemas.ts, call the engine (or the device registry,
 * which persists device changes), and return plain data; control-server.ts does the HTTP plumbing and
 * turns thrown BlockErrors into `{ "error": { "errno", "message" } }` with the status of http-status.ts.
 *
 * Long polls (wait-event) end early with ESHUTDOWN when the daemon stops. Not done: a wait cannot be
 * cancelled in the engine when its client disconnects, so an event that arrives for a gone client is
 * lost; `snapshot watch` therefore waits in short (1 s) slices.
 */
import type { z } from "zod";
import { BlockError } from "../block/errors.js";
import type { SnapshotInfo } from "../engine/engine-types.js";
import type { EventRead } from "../engine/event-log.js";
import { exposition } from "../metrics/text-format.js";
import { assert } from "../util/assert.js";
import type { Logger, LogLevelControl } from "../util/logger.js";
import {
  cbtInfoView,
  deviceView as deviceWireView,
  type ExportReach,
  snapshotEventView,
  snapshotView as snapshotWireView,
  storageInfoView,
  unavailableDeviceView,
} from "./api-mapping.js";
import {
  appendStorageBodySchema,
  backupBodySchema,
  backupEventsQuerySchema,
  backupMountBodySchema,
  cbtMapQuerySchema,
  deviceAddBodySchema,
  emptyObjectSchema,
  forceQuerySchema,
  logLevelBodySchema,
  markDirtyBodySchema,
  restartBodySchema,
  restoreBodySchema,
  snapshotAddDeviceBodySchema,
  snapshotCreateBodySchema,
  takeBodySchema,
  waitEventQuerySchema,
} from "./api-schemas.js";
import type {
  AccessRulesView,
  AccessView,
  BackupJobEventsView,
  CbtInfoView,
  CbtMapJsonView,
  DestroyedView,
  DeviceListView,
  DeviceView,
  EventView,
  LogLevelView,
  RemovedView,
  SnapshotListView,
  SnapshotRecoveryView,
  SnapshotView,
  StatusView,
  StorageView,
  TlsView,
  UnavailableDeviceView,
} from "./api-types.js";
import type { BackupJobs } from "./backup-jobs.js";
import type { BackupMounts, BackupMountView } from "./backup-mounts.js";
import type { ControlEngine } from "./control-engine.js";
import type { DeviceRegistry } from "./device-registry.js";
import { type ExportAddresses, fusePathFor, nbdUrisFor } from "./export-urls.js";
import type { StorageOnDevice } from "./storage-placement.js";

export interface DaemonIdentity {
  readonly pid: number;
  readonly version: string;
  readonly stateDir: string;
  readonly controlSocket: string;
  readonly access: AccessView;
  /** Present when the daemon runs as a supervised engine (serve --supervise). */
  readonly supervisor?: {
    readonly pid: number;
    readonly engineNumber: number;
    readonly restarts: readonly { readonly at: string; readonly cause: string }[];
  };
}

export interface ControlContext {
  readonly engine: ControlEngine;
  readonly registry: Pick<DeviceRegistry, "add" | "remove" | "unavailable" | "cbtRecoveries">;
  /** What became of each kept snapshot at start (absent in tests that keep none). */
  readonly snapshotRecoveries?: () => readonly SnapshotRecoveryView[];
  readonly identity: DaemonIdentity;
  readonly addresses: ExportAddresses;
  /** NBD over TLS on every NBD listener; absent: off. */
  readonly nbdTls?: TlsView;
  /** Aborted when the daemon begins to shut down: long polls end with ESHUTDOWN. */
  readonly shutdownSignal: AbortSignal;
  /** Backup jobs (absent in tests that need none). */
  readonly backups?: BackupJobs;
  /** Backups served as exports (absent in tests that need none). */
  readonly backupMounts?: BackupMounts;
  /**
   * A planned restart (supervised engines only): checks, then hands over after the answer is sent.
   * Absent when the daemon runs without a supervisor.
   */
  readonly restart?: (options: { force: boolean }) => { enginePid: number };
  /** The Prometheus text of a scrape (src/metrics/); absent in tests that need none. */
  readonly metrics?: () => string;
  /** The NBD access rules (serve --access); absent in tests that need none. */
  /**
   * What holds an export's FUSE file open through a loop device (mounts, holders, bare attachments);
   * absent without a FUSE face. Destroy refuses a snapshot whose image is in use unless forced.
   */
  readonly imageUsers?: (exportName: string) => Promise<string[]>;
  /** Which of `devices` holds the file system `storagePath` is on; absent without a FUSE face. */
  readonly storageOnDevices?: (
    storagePath: string,
    devices: readonly string[],
  ) => Promise<StorageOnDevice | null>;
  /** Absent in tests: nothing is logged. */
  readonly logger?: Logger;
  /** The daemon's log level (POST /v1/log-level); absent in tests that need none. */
  readonly logLevel?: LogLevelControl;
  readonly accessRules?: {
    view(): AccessRulesView;
    /** Rereads the file; a bad file throws its one-line error and the rules in force stay. */
    reload(): Promise<AccessRulesView>;
  };
}

export interface RouteRequest {
  readonly params: Readonly<Record<string, string>>;
  readonly query: Readonly<Record<string, string>>;
  /** Parsed JSON body, or undefined when the request had none. */
  readonly body: unknown;
}

export type RouteResult =
  | { readonly status: number; readonly json: unknown }
  | { readonly status: number; readonly binary: Uint8Array }
  | { readonly status: number; readonly streamed: StreamedBody };

/**
 * A large answer sent piece by piece (control-server.ts waits for 'drain' between pieces), so that it is
 * never built whole in memory: the pieces are made as they are sent.
 */
export interface StreamedBody {
  readonly contentType: string;
  readonly lengthBytes: number;
  readonly pieces: Iterable<Uint8Array | string>;
}

const metricsContentType = exposition.contentType;

/** Bytes of the map per base64 piece of a streamed CBT map (a multiple of 3: no padding inside). */
const mapBase64PieceBytes = 3 * 64 * 1024;

type Handler = (context: ControlContext, request: RouteRequest) => Promise<RouteResult> | RouteResult;

interface Route {
  readonly method: "GET" | "POST" | "DELETE";
  /** Segments after the leading `/`; `:name` matches one segment into params.name. */
  readonly pattern: readonly string[];
  readonly handler: Handler;
}

function route(method: Route["method"], path: string, handler: Handler): Route {
  return { method, pattern: path.split("/").slice(1), handler };
}

function ok(json: unknown, status = 200): RouteResult {
  assert(status >= 200 && status < 300, `ok() answers success, not ${status}`);
  return { status, json };
}

function parse<T extends z.ZodType>(schema: T, value: unknown, what: string): z.infer<T> {
  const parsed = schema.safeParse(value ?? {});
  if (parsed.success) return parsed.data;
  const details = parsed.error.issues
    .map((issue) => (issue.path.length > 0 ? `${issue.path.join(".")}: ${issue.message}` : issue.message))
    .join("; ");
  throw new BlockError("EINVAL", `invalid ${what}: ${details}`);
}

function requireNoQuery(request: RouteRequest): void {
  parse(emptyObjectSchema, request.query, "query");
}

function param(request: RouteRequest, name: string): string {
  const value = request.params[name];
  if (value === undefined) throw new BlockError("EINVAL", `missing path parameter ${name}`);
  return value;
}

/** Shortest prefix of a snapshot id accepted in its place (like docker's and git's short ids). */
export const snapshotIdPrefixCharsMin = 4;
/** Candidates named in an ambiguous-prefix error. */
const ambiguousCandidatesShown = 8;

/**
 * The `:id` of a snapshot route: a full id, or a unique prefix of one of at least
 * snapshotIdPrefixCharsMin characters. An ambiguous prefix is EINVAL naming the candidates; an unknown id
 * or prefix is passed on as given, so the engine answers ESRCH.
 */
function snapshotId(context: ControlContext, request: RouteRequest): string {
  return resolveSnapshotId(context, param(request, "id"));
}

/** A full snapshot id, or the one id a unique prefix names (see snapshotId); anything else as given. */
function resolveSnapshotId(context: ControlContext, given: string): string {
  if (given.length < snapshotIdPrefixCharsMin) return given;
  const ids = context.engine.listSnapshots().map((info) => info.id);
  if (ids.includes(given)) return given;
  const matches = ids.filter((id) => id.startsWith(given));
  if (matches.length === 1) return matches[0] as string;
  if (matches.length > 1) {
    const shown = matches.slice(0, ambiguousCandidatesShown).join(", ");
    const more = matches.length > ambiguousCandidatesShown ? `, … (${matches.length} in all)` : "";
    throw new BlockError("EINVAL", `Snapshot id prefix ${given} is ambiguous: ${shown}${more}`);
  }
  return given;
}

function reach(context: ControlContext, exportName: string): ExportReach {
  return {
    nbdUris: nbdUrisFor(exportName, context.addresses),
    fusePath: fusePathFor(exportName, context.addresses),
  };
}

function deviceView(context: ControlContext, name: string): DeviceView {
  const info = context.engine.deviceInfo(name);
  return deviceWireView(info, reach(context, info.name));
}

function listDeviceViews(context: ControlContext): DeviceView[] {
  return context.engine.listDevices().map((info) => deviceWireView(info, reach(context, info.name)));
}

function unavailableDeviceViews(context: ControlContext): UnavailableDeviceView[] {
  return context.registry.unavailable().map(unavailableDeviceView);
}

function snapshotView(context: ControlContext, info: SnapshotInfo): SnapshotView {
  return snapshotWireView(info, (imageName) => reach(context, imageName));
}

/**
 * A snapshot whose image is open through a loop device (mounted or only attached) is not destroyed unless
 * forced: the file system on it would see I/O errors and its journal abort (like LVM's open volume).
 */
async function refuseImagesInUse(context: ControlContext, id: string, force: boolean): Promise<void> {
  const { imageUsers } = context;
  if (imageUsers === undefined) return;
  const users: string[] = [];
  for (const device of context.engine.snapshotInfo(id).devices) {
    if (device.imageName === null) continue;
    for (const user of await imageUsers(device.imageName)) users.push(`${device.imageName}: ${user}`);
  }
  if (users.length === 0) return;
  if (!force) {
    throw new BlockError(
      "EBUSY",
      `Snapshot ${id} is in use (${users.join("; ")}): unmount and detach it first, or destroy with --force`,
    );
  }
  context.logger?.warn({ snapshot: id, users }, "destroying a snapshot whose image is in use");
}

/**
 * A difference storage on a file system that lives on one of its snapshot's own devices (through a loop
 * device over the device's FUSE file) is refused unless forced: the take would hang in the freeze.
 */
async function refuseStorageOnMembers(
  context: ControlContext,
  storagePaths: readonly string[],
  devices: readonly string[],
  force: boolean,
): Promise<void> {
  const { storageOnDevices } = context;
  if (storageOnDevices === undefined || devices.length === 0) return;
  for (const storagePath of storagePaths) {
    const found = await storageOnDevices(storagePath, devices);
    if (found === null) continue;
    const where = `${found.mountPoint} (${found.fsType} on ${found.loopDevice} over device ${found.device})`;
    if (force) {
      context.logger?.warn(
        { storage: storagePath, ...found },
        "storage on a member device accepted (forced)",
      );
      continue;
    }
    throw new BlockError(
      "EINVAL",
      `Cannot use ${JSON.stringify(storagePath)} as difference storage of a snapshot of ${found.device}: it is on ${where}, and the take would hang freezing it; put it elsewhere, or use --force`,
    );
  }
}

function waitEventOrShutdown(
  context: ControlContext,
  id: string,
  since: number | null,
  timeoutMs: number,
): Promise<EventRead> {
  return orShutdown(context, () => context.engine.readEvent(id, since, timeoutMs));
}

/** A long poll that ends early with ESHUTDOWN when the daemon stops (`onShutdown` then runs once). */
async function orShutdown<T>(
  context: ControlContext,
  wait: () => Promise<T>,
  onShutdown: () => void = () => {},
): Promise<T> {
  const { shutdownSignal } = context;
  if (shutdownSignal.aborted) throw new BlockError("ESHUTDOWN", "the daemon is shutting down");
  let onAbort = (): void => {};
  const aborted = new Promise<never>((_resolve, reject) => {
    onAbort = () => {
      onShutdown();
      reject(new BlockError("ESHUTDOWN", "the daemon is shutting down"));
    };
    shutdownSignal.addEventListener("abort", onAbort, { once: true });
  });
  try {
    return await Promise.race([wait(), aborted]);
  } finally {
    shutdownSignal.removeEventListener("abort", onAbort);
  }
}

function accessRulesOf(context: ControlContext): NonNullable<ControlContext["accessRules"]> {
  if (context.accessRules === undefined) throw new BlockError("ENOTSUP", "this daemon has no access rules");
  return context.accessRules;
}

function logLevelOf(context: ControlContext): LogLevelControl {
  if (context.logLevel === undefined) throw new BlockError("ENOTSUP", "this daemon's log level is fixed");
  return context.logLevel;
}

function accessRulesSummary(context: ControlContext): StatusView["accessRules"] {
  const view = context.accessRules?.view();
  if (view?.file == null || view.rules === null || view.loadedAt === null) return null;
  return { file: view.file, rules: view.rules.length, loadedAt: view.loadedAt };
}

export const routes: readonly Route[] = [
  route("GET", "/v1/status", (context, request) => {
    requireNoQuery(request);
    const { engine, identity, addresses } = context;
    const status: StatusView = {
      ...identity,
      nbd: {
        socketPath: addresses.nbdSocketPath,
        tcp: addresses.nbdTcp,
        tls: context.nbdTls ?? { mode: "off", credentials: [], verifyPeer: false },
      },
      accessRules: accessRulesSummary(context),
      fuse: { mountDir: addresses.fuseMountDir },
      devices: listDeviceViews(context),
      devicesUnavailable: unavailableDeviceViews(context),
      cbtRecoveries: context.registry.cbtRecoveries(),
      snapshotRecoveries: [...(context.snapshotRecoveries?.() ?? [])],
      snapshots: engine.listSnapshots().map((info) => snapshotView(context, info)),
      ...(context.logLevel === undefined ? {} : { logLevel: context.logLevel.get() }),
    };
    return ok(status);
  }),

  // Prometheus' conventional path, outside /v1: scrapers are configured with it by default.
  route("GET", "/metrics", (context, request) => {
    requireNoQuery(request);
    if (context.metrics === undefined) throw new BlockError("ENOTSUP", "this daemon serves no metrics");
    const text = context.metrics();
    return {
      status: 200,
      streamed: { contentType: metricsContentType, lengthBytes: Buffer.byteLength(text), pieces: [text] },
    };
  }),

  route("GET", "/v1/log-level", (context, request) => {
    requireNoQuery(request);
    return ok({ level: logLevelOf(context).get() } satisfies LogLevelView);
  }),

  route("POST", "/v1/log-level", (context, request) => {
    requireNoQuery(request);
    const { level } = parse(logLevelBodySchema, request.body, "log level");
    const control = logLevelOf(context);
    const previous = control.get();
    control.set(level);
    return ok({ level, previous } satisfies LogLevelView);
  }),

  route("GET", "/v1/access", (context, request) => {
    requireNoQuery(request);
    return ok(accessRulesOf(context).view());
  }),

  route("POST", "/v1/access/reload", async (context, request) => {
    requireNoQuery(request);
    parse(emptyObjectSchema, request.body ?? {}, "access reload");
    return ok(await accessRulesOf(context).reload());
  }),

  route("POST", "/v1/restart", (context, request) => {
    requireNoQuery(request);
    const { force } = parse(restartBodySchema, request.body ?? {}, "restart");
    if (context.restart === undefined) {
      throw new BlockError(
        "ENOTSUP",
        "a restart needs a supervisor: run the daemon with blocksnap serve --supervise",
      );
    }
    return ok({ restarting: true, ...context.restart({ force: force === true }) }, 202);
  }),

  route("POST", "/v1/backups", (context, request) => {
    requireNoQuery(request);
    const body = parse(backupBodySchema, request.body, "backup");
    const job = backupJobs(context).start({
      ...body,
      level: body.level ?? "auto",
      snapshotId: body.snapshotId === undefined ? undefined : resolveSnapshotId(context, body.snapshotId),
    });
    return ok(job, 202);
  }),

  route("POST", "/v1/backups/restores", async (context, request) => {
    requireNoQuery(request);
    const body = parse(restoreBodySchema, request.body, "restore");
    return ok(await backupJobs(context).startRestore(body), 202);
  }),

  route("GET", "/v1/backups/jobs", (context, request) => {
    requireNoQuery(request);
    return ok({ jobs: backupJobs(context).list() });
  }),

  route("GET", "/v1/backups/jobs/:id", (context, request) => {
    requireNoQuery(request);
    return ok(backupJobs(context).get(param(request, "id")));
  }),

  route("POST", "/v1/backups/mounts", async (context, request) => {
    requireNoQuery(request);
    const body = parse(backupMountBodySchema, request.body, "backup mount");
    const view = await backupMounts(context).mount(body);
    return ok(withAddresses(context, view), 201);
  }),

  route("GET", "/v1/backups/mounts", (context, request) => {
    requireNoQuery(request);
    return ok({
      mounts: backupMounts(context)
        .list()
        .map((view) => withAddresses(context, view)),
    });
  }),

  route("DELETE", "/v1/backups/mounts/:name", async (context, request) => {
    requireNoQuery(request);
    await backupMounts(context).unmount(param(request, "name"));
    return ok({ unmounted: param(request, "name") });
  }),

  route("GET", "/v1/backups/events", async (context, request) => {
    const { since, timeoutMs } = parse(backupEventsQuerySchema, request.query, "query");
    const jobs = backupJobs(context);
    // The daemon stopping closes the log: every waiter wakes (no timer is left behind).
    const read = await orShutdown(
      context,
      () => jobs.events.log.wait(since ?? 0, timeoutMs ?? 0),
      () => jobs.close(),
    );
    const view: BackupJobEventsView = {
      event: read.event === null || read.seq === null ? null : { ...read.event, seq: read.seq },
      nextSince: read.nextSince,
      missed: read.missed,
    };
    return ok(view);
  }),

  route("POST", "/v1/backups/jobs/:id/cancel", (context, request) => {
    requireNoQuery(request);
    parse(emptyObjectSchema, request.body ?? {}, "backup cancel");
    return ok(backupJobs(context).cancel(param(request, "id")), 202);
  }),

  route("GET", "/v1/devices", (context, request) => {
    requireNoQuery(request);
    const view: DeviceListView = {
      devices: listDeviceViews(context),
      devicesUnavailable: unavailableDeviceViews(context),
    };
    return ok(view);
  }),

  route("POST", "/v1/devices", async (context, request) => {
    requireNoQuery(request);
    const body = parse(deviceAddBodySchema, request.body, "device");
    const info = await context.registry.add(body);
    return ok(deviceView(context, info.name), 201);
  }),

  route("GET", "/v1/devices/:name", (context, request) => {
    requireNoQuery(request);
    return ok(deviceView(context, param(request, "name")));
  }),

  route("DELETE", "/v1/devices/:name", async (context, request) => {
    const { force } = parse(forceQuerySchema, request.query, "query");
    const name = param(request, "name");
    await context.registry.remove(name, { force: force === "true" || force === "1" });
    const view: RemovedView = { removed: name };
    return ok(view);
  }),

  route("GET", "/v1/devices/:name/cbt", (context, request) => {
    requireNoQuery(request);
    return ok(cbtInfoView(context.engine.cbtInfo(param(request, "name"))));
  }),

  route("GET", "/v1/devices/:name/cbt/map", (context, request) => {
    const { format } = parse(cbtMapQuerySchema, request.query, "query");
    const name = param(request, "name");
    // Info and map are read in the same tick, so they describe the same state.
    const info = context.engine.cbtInfo(name);
    const map = context.engine.cbtRead(name);
    if (format !== "base64") return { status: 200, binary: map };
    return { status: 200, streamed: cbtMapJsonBody(cbtInfoView(info), map) };
  }),

  route("POST", "/v1/devices/:name/cbt/mark-dirty", async (context, request) => {
    requireNoQuery(request);
    const name = param(request, "name");
    const body = parse(markDirtyBodySchema, request.body, "ranges");
    await context.engine.cbtMarkDirty(name, body.ranges);
    return ok(cbtInfoView(context.engine.cbtInfo(name)));
  }),

  route("GET", "/v1/snapshots", (context, request) => {
    requireNoQuery(request);
    const view: SnapshotListView = {
      snapshots: context.engine.listSnapshots().map((info) => snapshotView(context, info)),
    };
    return ok(view);
  }),

  route("POST", "/v1/snapshots", async (context, request) => {
    requireNoQuery(request);
    const { force, ...body } = parse(snapshotCreateBodySchema, request.body, "snapshot");
    await refuseStorageOnMembers(context, [body.storage], body.devices ?? [], force === true);
    const info = await context.engine.createSnapshot(body);
    return ok(snapshotView(context, info), 201);
  }),

  route("GET", "/v1/snapshots/:id", (context, request) => {
    requireNoQuery(request);
    return ok(snapshotView(context, context.engine.snapshotInfo(snapshotId(context, request))));
  }),

  route("DELETE", "/v1/snapshots/:id", async (context, request) => {
    const { force } = parse(forceQuerySchema, request.query, "query");
    const id = snapshotId(context, request);
    await refuseImagesInUse(context, id, force === "true" || force === "1");
    await context.engine.destroySnapshot(id);
    const view: DestroyedView = { destroyed: id };
    return ok(view);
  }),

  route("POST", "/v1/snapshots/:id/devices", async (context, request) => {
    requireNoQuery(request);
    const id = snapshotId(context, request);
    const body = parse(snapshotAddDeviceBodySchema, request.body, "device");
    const { storage } = context.engine.snapshotInfo(id);
    await refuseStorageOnMembers(context, storage.paths, [body.device], body.force === true);
    context.engine.addDeviceToSnapshot(id, body.device);
    return ok(snapshotView(context, context.engine.snapshotInfo(id)));
  }),

  route("POST", "/v1/snapshots/:id/storage", async (context, request) => {
    requireNoQuery(request);
    const { force, ...body } = parse(appendStorageBodySchema, request.body, "storage");
    const id = snapshotId(context, request);
    const members = context.engine.snapshotInfo(id).devices.map((device) => device.name);
    await refuseStorageOnMembers(context, [body.storage], members, force === true);
    const storage = await context.engine.appendStorage(id, body);
    const view: StorageView = { storage: storageInfoView(storage) };
    return ok(view);
  }),

  route("POST", "/v1/snapshots/:id/take", async (context, request) => {
    requireNoQuery(request);
    const body = parse(takeBodySchema, request.body, "take options");
    const info = await context.engine.takeSnapshot(snapshotId(context, request), body);
    return ok(snapshotView(context, info));
  }),

  route("GET", "/v1/snapshots/:id/event", async (context, request) => {
    const { timeoutMs, since } = parse(waitEventQuerySchema, request.query, "query");
    const read = await waitEventOrShutdown(context, snapshotId(context, request), since ?? null, timeoutMs);
    const view: EventView = {
      event:
        read.event === null || read.seq === null ? null : { ...snapshotEventView(read.event), seq: read.seq },
      nextSince: read.nextSince,
      missed: read.missed,
    };
    return ok(view);
  }),
];

// One handler per method and path: a duplicate would silently shadow the later one.
assert(
  new Set(routes.map((entry) => `${entry.method} /${entry.pattern.join("/")}`)).size === routes.length,
  "every route is declared once",
);

export type RouteMatch =
  | { readonly kind: "found"; readonly route: Route; readonly params: Record<string, string> }
  | { readonly kind: "method-not-allowed"; readonly allowed: readonly string[] }
  | { readonly kind: "not-found" };

/** Finds the route for a method and a raw URL path; `:param` segments are percent-decoded. */
export function matchRoute(method: string, pathname: string): RouteMatch {
  const segments = pathname.split("/").slice(1);
  const allowed: string[] = [];
  for (const candidate of routes) {
    const params = matchSegments(candidate.pattern, segments);
    if (params === null) continue;
    if (candidate.method === method) return { kind: "found", route: candidate, params };
    allowed.push(candidate.method);
  }
  return allowed.length > 0 ? { kind: "method-not-allowed", allowed } : { kind: "not-found" };
}

function matchSegments(
  pattern: readonly string[],
  segments: readonly string[],
): Record<string, string> | null {
  if (pattern.length !== segments.length) return null;
  const params: Record<string, string> = {};
  for (let index = 0; index < pattern.length; index++) {
    const expected = pattern[index]!;
    const actual = segments[index]!;
    if (expected.startsWith(":")) {
      if (actual === "") return null;
      let decoded: string;
      try {
        decoded = decodeURIComponent(actual);
      } catch {
        return null;
      }
      params[expected.slice(1)] = decoded;
    } else if (expected !== actual) {
      return null;
    }
  }
  return params;
}

/** Where a mounted backup is served: its NBD URIs and FUSE file. */
function withAddresses(context: ControlContext, view: BackupMountView) {
  return {
    ...view,
    nbdUris: nbdUrisFor(view.name, context.addresses),
    fusePath: fusePathFor(view.name, context.addresses),
  };
}

function backupMounts(context: ControlContext): BackupMounts {
  if (context.backupMounts === undefined) throw new BlockError("ENOTSUP", "this daemon mounts no backups");
  return context.backupMounts;
}

function backupJobs(context: ControlContext): BackupJobs {
  if (context.backups === undefined) throw new BlockError("ENOTSUP", "this daemon runs no backups");
  return context.backups;
}

/**
 * The `format=base64` answer, `{...info, "mapBase64": "…"}`, streamed: the map (one copy, taken in the same
 * tick as the info) is encoded a piece at a time as the socket takes it, never as one string. JSON.stringify
 * of an object with a string value ends in `"}`, so the prefix and suffix split around the value.
 */
function cbtMapJsonBody(info: CbtInfoView, map: Uint8Array): StreamedBody {
  const placeholder = "\u0000";
  const template = JSON.stringify({ ...info, mapBase64: placeholder } satisfies CbtMapJsonView);
  const at = template.lastIndexOf(JSON.stringify(placeholder));
  assert(at > 0 && template.endsWith(`${JSON.stringify(placeholder)}}`), "the map is the last member");
  const prefix = `${template.slice(0, at)}"`;
  const suffix = '"}\n';
  const mapBuffer = Buffer.from(map.buffer, map.byteOffset, map.byteLength);
  function* pieces(): Iterable<string> {
    yield prefix;
    for (let offset = 0; offset < mapBuffer.byteLength; offset += mapBase64PieceBytes) {
      yield mapBuffer.subarray(offset, offset + mapBase64PieceBytes).toString("base64");
    }
    yield suffix;
  }
  return {
    contentType: "application/json",
    lengthBytes:
      Buffer.byteLength(prefix) + 4 * Math.ceil(mapBuffer.byteLength / 3) + Buffer.byteLength(suffix),
    pieces: pieces(),
  };
}
