/**
 * BackendClaims: which bytes of which files and block devices the engine writes, so that no two users
 * share them: a device backend is never another device's backend nor a live snapshot's storage, a storage
 * area is never a backend nor another area (the ways to reach the same bytes — hard links, `..`, symlinks,
 * loop devices, partitions, /proc/<pid>/fd — are folded by src/util/file-identity.ts).
 *
 * Two steps per path. admit() runs before anything is opened: the caller's PathPolicy first (the daemon's
 * refusals by place: state directory, its own FUSE mount, /proc, /sys, relative paths), then the type and
 * identity of what the path names now (so that an existing file is never created, extended or written
 * before it is refused), and a block device that is mounted or held is refused (EBUSY). confirm() runs on
 * the opened descriptor: it must be a regular file or block device, the same object that was admitted
 * (a path swapped in between is refused), acceptable to the policy, and free; then it is claimed in the same
 * synchronous step as the last check, so two concurrent requests cannot both claim the same bytes.
 *
 * Claims are released when their owner (a device, a snapshot) goes away.
 */
import type { BigIntStats } from "node:fs";
import { BlockError } from "../block/errors.js";
import {
  blockDeviceUsers,
  collide,
  type FileIdentity,
  fstatDescriptor,
  identityOf,
  kernelPathOf,
  sameObject,
  statOrNull,
} from "../util/file-identity.js";

export type PathRole = "backend" | "storage";

/** A file about to be opened or just opened, as a PathPolicy sees it. */
export interface OpenedFile {
  readonly path: string;
  readonly role: PathRole;
  readonly stats: BigIntStats;
  readonly identity: FileIdentity;
  /** The kernel's name of what was opened (readlink /proc/self/fd/N); null before opening. */
  readonly kernelPath: string | null;
}

/** Refusals by place, supplied by the embedder (the daemon's is src/daemon/path-policy.ts). */
export interface PathPolicy {
  /** Before anything is opened or stat'ed through `path`; throws a BlockError to refuse. */
  checkPath(path: string, role: PathRole): Promise<void>;
  /** On the identity of what is (about to be, or was) opened; throws a BlockError to refuse. */
  checkFile(file: OpenedFile): Promise<void>;
}

export interface Admission {
  readonly path: string;
  readonly role: PathRole;
  /** What the path named before opening; null when it did not exist (or is a storage directory). */
  readonly before: FileIdentity | null;
}

/** Whoever holds a claim: compared by identity (a device entry's token, a snapshot). */
export type ClaimOwner = object;

interface Claim {
  readonly owner: ClaimOwner;
  readonly label: string;
  readonly identity: FileIdentity;
}

export class BackendClaims {
  private readonly policy: PathPolicy | null;
  private readonly claims: Claim[] = [];

  constructor(policy: PathPolicy | null) {
    this.policy = policy;
  }

  async admit(path: string, role: PathRole): Promise<Admission> {
    await this.policy?.checkPath(path, role);
    let stats: BigIntStats | null;
    try {
      stats = await statOrNull(path);
    } catch (error) {
      throw new BlockError(
        "EINVAL",
        `Cannot use ${JSON.stringify(path)} as ${roleText(role)}: ${String(error)}`,
        {
          cause: error,
        },
      );
    }
    if (stats === null || (role === "storage" && stats.isDirectory())) return { path, role, before: null };
    const identity = await identityOf(stats);
    if (identity === null) {
      throw new BlockError(
        "EINVAL",
        `Cannot use ${JSON.stringify(path)} as ${roleText(role)}: only a regular file or a block device${role === "storage" ? " (or a directory for a temporary file)" : ""}`,
      );
    }
    await this.policy?.checkFile({ path, role, stats, identity, kernelPath: null });
    this.checkFree(path, role, identity);
    if (identity.deviceNumber !== null) {
      const users = await blockDeviceUsers(identity.deviceNumber);
      if (users.length > 0) {
        throw new BlockError(
          "EBUSY",
          `Cannot use block device ${JSON.stringify(path)} as ${roleText(role)}: it is in use (${users.join(", ")})`,
        );
      }
    }
    return { path, role, before: identity };
  }

  /**
   * Checks the opened descriptor `fd` of an admitted path and claims it for `owner` (`label` names the
   * owner in refusals, e.g. "the backend of device disk0").
   */
  async confirm(admission: Admission, fd: number, owner: ClaimOwner, label: string): Promise<void> {
    const { path, role } = admission;
    const stats = await fstatDescriptor(fd);
    const kernelPath = await kernelPathOf(fd);
    const identity = await identityOf(stats, kernelPath);
    if (identity === null) {
      throw new BlockError(
        "EINVAL",
        `Cannot use ${JSON.stringify(path)} as ${roleText(role)}: only a regular file or a block device`,
      );
    }
    if (admission.before !== null && !sameObject(admission.before, identity)) {
      throw new BlockError(
        "EAGAIN",
        `${JSON.stringify(path)} was replaced while it was being opened; try again`,
      );
    }
    await this.policy?.checkFile({ path, role, stats, identity, kernelPath });
    this.checkFree(path, role, identity);
    this.claims.push({ owner, label, identity });
  }

  release(owner: ClaimOwner): void {
    for (let index = this.claims.length - 1; index >= 0; index--) {
      if (this.claims[index]?.owner === owner) this.claims.splice(index, 1);
    }
  }

  private checkFree(path: string, role: PathRole, identity: FileIdentity): void {
    const taken = this.claims.find((claim) => collide(claim.identity, identity));
    if (taken !== undefined) {
      throw new BlockError(
        "EINVAL",
        `Cannot use ${JSON.stringify(path)} as ${roleText(role)}: it is ${taken.label} (the same file or device, reached another way)`,
      );
    }
  }
}

function roleText(role: PathRole): string {
  return role === "backend" ? "a device backend" : "difference storage";
}
