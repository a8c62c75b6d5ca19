/**
 * A real OpenStack Swift with its S3 API (s3api + tempauth) for tests and benchmarks: a one-replica
 * all-in-one cluster in a temporary directory, started and stopped by the caller.
 *
 * It installs nothing: `.ci/run` installs Debian's swift, swift-proxy, swift-object, swift-container,
 * swift-account and memcached. Layout: rings with one device each (built in one Python process with
 * swift's RingBuilder, which is faster than nine swift-ring-builder runs), object, container, account and
 * proxy servers with workers = 1 on free loopback ports, mount_check = false, memcached on its own free port
 * (without it every proxy request answers 503), tempauth user test:tester / testing (the S3 access key
 * `test:tester`, secret `testing`), path-style, region us-east-1. The servers drop to user `swift` when run
 * as root (so the device directory is chowned to it), else to the current user. They run in the foreground
 * with `-v`, so their logs land in <dir>/<server>.log instead of syslog.
 *
 * Swift reads its hash path secret from /etc/swift/swift.conf and has no option to move that file; each
 * server is therefore started by a small Python wrapper that points swift at the temporary directory
 * (`set_swift_dir`) before running the server as its packaged script does.
 *
 * Policy: when Swift is missing or will not start, a root run (CI) fails; a run as another user skips with
 * the reason (swiftSkipReason). Every process runs in its own process group and is stopped by its id.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream } from "node:fs";
import { chmod, chown, mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { run, which } from "../helpers/commands.js";

export const swiftAccessKeyId = "test:tester";
export const swiftSecretAccessKey = "testing";
export const swiftRegion = "us-east-1";

const python = "/usr/bin/python3";
const serverKinds = ["object", "container", "account", "proxy"] as const;
type ServerKind = (typeof serverKinds)[number];
const healthTimeoutMs = 60_000;
const healthIntervalMs = 50;
const stopTimeoutMs = 10_000;

const ringScript = `
import sys
from swift.common.ring import RingBuilder
swift_dir = sys.argv[1]
for name, port in (("object", sys.argv[2]), ("container", sys.argv[3]), ("account", sys.argv[4])):
    builder = RingBuilder(4, 1, 0)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port),
                     "device": "d1", "weight": 100, "meta": ""})
    builder.rebalance()
    builder.get_ring().save("%s/%s.ring.gz" % (swift_dir, name))
`;

const serverScript = `
import os, sys, time
from swift.common import utils
swift_dir = sys.argv.pop(1)
utils.set_swift_dir(swift_dir)
from swift.common.wsgi import run_wsgi
kind = sys.argv.pop(1)
conf_file, options = utils.parse_options()
extra = {}
if kind == "object-server":
    from swift.obj import server
    extra["global_conf_callback"] = server.global_conf_callback
elif kind == "proxy-server":
    import swift.proxy.server
    import swift.common.middleware.s3api.s3api
    # The rings are built while this process imports; the proxy reads them when it starts.
    for _ in range(600):
        if all(os.path.exists("%s/%s.ring.gz" % (swift_dir, name)) for name in ("object", "container", "account")):
            break
        time.sleep(0.05)
sys.exit(run_wsgi(conf_file, kind, **extra, **options))
`;

/** Why Swift cannot run here, or undefined when its programs are installed. */
export function swiftMissingReason(): string | undefined {
  const missing = [python, "swift-proxy-server", "swift-object-server", "memcached"].filter(
    (name) => which(name) === undefined,
  );
  return missing.length === 0
    ? undefined
    : `OpenStack Swift is not installed (missing ${missing.join(", ")}; .ci/run installs swift, swift-proxy, swift-object, swift-container, swift-account and memcached)`;
}

/** Skipping is allowed only when not root; as root (CI) a Swift that cannot start is a failure. */
export function swiftSkipReason(error: unknown): string {
  const reason = error instanceof Error ? error.message : String(error);
  if (process.getuid?.() === 0) throw error instanceof Error ? error : new Error(reason);
  return `skipped (not root): ${reason}`;
}

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

async function userIds(name: string): Promise<{ uid: number; gid: number } | null> {
  const passwd = await readFile("/etc/passwd", "utf8");
  for (const line of passwd.split("\n")) {
    const fields = line.split(":");
    if (fields[0] === name) return { uid: Number(fields[2]), gid: Number(fields[3]) };
  }
  return null;
}

function serverConfig(kind: ServerKind, options: ConfigOptions): string {
  const common = [
    "[DEFAULT]",
    "bind_ip = 127.0.0.1",
    `bind_port = ${options.ports[kind]}`,
    "workers = 1",
    `user = ${options.user}`,
    `swift_dir = ${options.swiftDir}`,
    `log_level = ${kind === "proxy" ? "INFO" : "WARNING"}`,
  ];
  if (kind !== "proxy") {
    return [
      ...common,
      `devices = ${options.devicesDir}`,
      "mount_check = false",
      "[pipeline:main]",
      `pipeline = healthcheck ${kind}-server`,
      `[app:${kind}-server]`,
      `use = egg:swift#${kind}`,
      "[filter:healthcheck]",
      "use = egg:swift#healthcheck",
      "",
    ].join("\n");
  }
  const filters: Record<string, string[]> = {
    catch_errors: [],
    gatekeeper: [],
    healthcheck: [],
    proxy_logging: [],
    memcache: [`memcache_servers = 127.0.0.1:${options.ports.memcached}`],
    listing_formats: [],
    s3api: [`location = ${swiftRegion}`],
    tempauth: [`user_test_tester = ${swiftSecretAccessKey} .admin`],
    copy: [],
    slo: [],
    dlo: [],
    versioned_writes: [],
  };
  return [
    ...common,
    "[pipeline:main]",
    "pipeline = catch_errors gatekeeper healthcheck proxy_logging memcache listing_formats s3api tempauth copy slo dlo versioned_writes proxy_logging proxy-server",
    "[app:proxy-server]",
    "use = egg:swift#proxy",
    "account_autocreate = true",
    "allow_account_management = true",
    ...Object.entries(filters).flatMap(([name, lines]) => [
      `[filter:${name}]`,
      `use = egg:swift#${name}`,
      ...lines,
    ]),
    "",
  ].join("\n");
}

interface ConfigOptions {
  readonly ports: Record<ServerKind | "memcached", number>;
  readonly user: string;
  readonly swiftDir: string;
  readonly devicesDir: string;
}

interface Running {
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
  exitCode: number | null | undefined;
}

export class SwiftServer {
  readonly directory: string;
  /** The S3 endpoint, path-style: http://127.0.0.1:PORT */
  readonly endpoint: string;
  readonly accessKeyId = swiftAccessKeyId;
  readonly secretAccessKey = swiftSecretAccessKey;
  readonly region = swiftRegion;
  readonly startMs: number;

  private readonly options: ConfigOptions;
  private readonly running = new Map<ServerKind | "memcached", Running>();

  private constructor(directory: string, options: ConfigOptions, startMs: number) {
    this.directory = directory;
    this.options = options;
    this.endpoint = `http://127.0.0.1:${options.ports.proxy}`;
    this.startMs = startMs;
  }

  /** Starts a fresh cluster and waits until every server answers its health check. */
  static async start(): Promise<SwiftServer> {
    const missing = swiftMissingReason();
    if (missing !== undefined) throw new Error(missing);
    const startedAt = performance.now();
    const directory = await mkdtemp(join(tmpdir(), "blocksnap-swift-"));
    // The servers run as another user: it must reach the device directory and read the configuration.
    await chmod(directory, 0o755);
    const swiftDir = join(directory, "etc");
    const devicesDir = join(directory, "srv");
    await mkdir(swiftDir);
    await mkdir(join(devicesDir, "d1"), { recursive: true });
    const isRoot = process.getuid?.() === 0;
    const user = isRoot ? "swift" : userInfo().username;
    if (isRoot) {
      const ids = await userIds("swift");
      if (ids === null) throw new Error("user swift does not exist (the swift package creates it)");
      await chown(devicesDir, ids.uid, ids.gid);
      await chown(join(devicesDir, "d1"), ids.uid, ids.gid);
    }
    const ports = {
      object: await freePort(),
      container: await freePort(),
      account: await freePort(),
      proxy: await freePort(),
      memcached: await freePort(),
    };
    const options: ConfigOptions = { ports, user, swiftDir, devicesDir };
    await writeFile(
      join(swiftDir, "swift.conf"),
      "[swift-hash]\nswift_hash_path_suffix = blocksnap-test\nswift_hash_path_prefix = blocksnap-test\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n",
    );
    for (const kind of serverKinds)
      await writeFile(join(swiftDir, `${kind}-server.conf`), serverConfig(kind, options));
    await writeFile(join(swiftDir, "run-server.py"), serverScript);
    const server = new SwiftServer(directory, options, 0);
    try {
      server.spawnMemcached(isRoot);
      // Rings and servers start together: the servers spend their first second importing Python.
      const ringsDir = join(directory, "rings-tmp");
      await mkdir(ringsDir);
      const rings = run(python, [
        "-c",
        ringScript,
        ringsDir,
        String(ports.object),
        String(ports.container),
        String(ports.account),
      ]);
      const healthy = server.startServers();
      healthy.catch(() => undefined); // awaited below; this only keeps an early failure from going unhandled
      const built = await rings;
      if (built.code !== 0) {
        await server.stopServers();
        throw new Error(`building the Swift rings failed: ${built.stderr.trim()}`);
      }
      // Moved in whole: a server never sees half a ring file.
      for (const kind of ["object", "container", "account"])
        await rename(join(ringsDir, `${kind}.ring.gz`), join(swiftDir, `${kind}.ring.gz`));
      await healthy;
    } catch (error) {
      await server.stop();
      throw error;
    }
    (server as { startMs: number }).startMs = performance.now() - startedAt;
    return server;
  }

  private spawnMemcached(isRoot: boolean): void {
    const args = ["-l", "127.0.0.1", "-p", String(this.options.ports.memcached), "-U", "0", "-m", "64"];
    if (isRoot) args.push("-u", "swift");
    this.spawnLogged("memcached", "memcached", args);
  }

  private spawnLogged(name: ServerKind | "memcached", command: string, args: string[]): void {
    const log = createWriteStream(join(this.directory, `${name}.log`), { flags: "a" });
    const child = spawn(command, args, { detached: true, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout?.pipe(log, { end: false });
    child.stderr?.pipe(log, { end: false });
    const running: Running = {
      child,
      exitCode: undefined,
      exited: new Promise((resolve) => {
        child.once("exit", (code) => {
          running.exitCode = code;
          resolve();
        });
        child.once("error", () => {
          running.exitCode = -1;
          resolve();
        });
      }),
    };
    void running.exited.then(() => log.end());
    this.running.set(name, running);
  }

  private async startServers(): Promise<void> {
    for (const kind of serverKinds) {
      this.spawnLogged(kind, python, [
        "-c",
        serverScript,
        this.options.swiftDir,
        `${kind}-server`,
        join(this.options.swiftDir, `${kind}-server.conf`),
        "-v",
      ]);
    }
    await this.waitHealthy();
  }

  private async waitHealthy(): Promise<void> {
    const deadline = performance.now() + healthTimeoutMs;
    const pending = new Set<ServerKind>(serverKinds);
    while (pending.size > 0) {
      for (const [name, running] of this.running) {
        if (running.exitCode !== undefined)
          throw new Error(`Swift ${name} exited (${running.exitCode}): ${await this.logTail(name)}`);
      }
      for (const kind of [...pending]) {
        const url = `http://127.0.0.1:${this.options.ports[kind]}/healthcheck`;
        const ok = await fetch(url, { signal: AbortSignal.timeout(2_000) })
          .then(async (response) => {
            await response.arrayBuffer();
            return response.ok;
          })
          .catch(() => false);
        if (ok) pending.delete(kind);
      }
      if (pending.size === 0) break;
      if (performance.now() > deadline)
        throw new Error(`Swift did not become healthy in ${healthTimeoutMs} ms: ${[...pending].join(", ")}`);
      await new Promise((resolve) => setTimeout(resolve, healthIntervalMs));
    }
  }

  async logTail(name: string): Promise<string> {
    const text = await readFile(join(this.directory, `${name}.log`), "utf8").catch(() => "");
    return text.split("\n").slice(-20).join("\n");
  }

  /** Stops the four Swift servers (memcached keeps running) and starts them again on the same ports. */
  async restart(): Promise<void> {
    await this.stopServers();
    await this.startServers();
  }

  /** Stops the Swift servers only: requests then fail with connection refused until startServers. */
  async stopServers(): Promise<void> {
    for (const kind of serverKinds) await this.stopOne(kind);
  }

  /** Stops everything and removes the directory. */
  async stop(): Promise<void> {
    for (const name of [...this.running.keys()]) await this.stopOne(name);
    await rm(this.directory, { recursive: true, force: true });
  }

  private async stopOne(name: ServerKind | "memcached"): Promise<void> {
    const running = this.running.get(name);
    if (running === undefined) return;
    this.running.delete(name);
    const pid = running.child.pid;
    if (pid === undefined || running.exitCode !== undefined) return;
    // The whole process group: a Swift server's worker is its child.
    const signalGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-pid, signal);
      } catch {
        // Already gone.
      }
    };
    signalGroup("SIGTERM");
    const timer = setTimeout(() => signalGroup("SIGKILL"), stopTimeoutMs);
    await running.exited;
    clearTimeout(timer);
    // The worker may outlive its parent by a moment; make sure the group is gone.
    signalGroup("SIGKILL");
  }
}
