/**
 * The daemon's access rules (serve --access FILE, src/nbd/access-rules.ts for the format): reads the file
 * at start (a bad file fails the start with its one-line error) and again on reload (SIGHUP, POST
 * /v1/access/reload). A reload that fails keeps the rules in force and reports why; one that succeeds
 * swaps the rules at once and hands the change to the NBD face (NbdServer.reviewAccess()), which closes
 * connections whose grant is gone and refuses later writes of those that became read-only.
 *
 * Without --access it allows everything (today's behaviour: socket permissions and TLS decide who gets in)
 * and a reload is refused with ENOTSUP. Locking: none; one event loop, and the swap is one assignment.
 */
import { open } from "node:fs/promises";
import { BlockError } from "../block/errors.js";
import {
  type AccessPolicy,
  type AccessRules,
  accessFileBytesMax,
  type Grant,
  parseAccessRules,
} from "../nbd/access-rules.js";
import type { AccessRulesView } from "./api-types.js";

export class AccessFile implements AccessPolicy {
  /** null: serve ran without --access. */
  readonly path: string | null;
  private rules: AccessRules | null;
  private loadedAt: Date | null;

  private constructor(path: string | null, rules: AccessRules | null) {
    this.path = path;
    this.rules = rules;
    this.loadedAt = rules === null ? null : new Date();
  }

  /** Reads and parses `path` (null: no access file, everything allowed). */
  static async load(path: string | null): Promise<AccessFile> {
    return new AccessFile(path, path === null ? null : await readRules(path));
  }

  grantFor(identity: string | null, exportName: string): Grant {
    return this.rules === null ? "rw" : this.rules.grantFor(identity, exportName);
  }

  /** Reads the file again; on any error the rules in force stay and the error is thrown. */
  async reload(): Promise<AccessRulesView> {
    if (this.path === null) {
      throw new BlockError("ENOTSUP", "no access rules to reload: the daemon was started without --access");
    }
    this.rules = await readRules(this.path);
    this.loadedAt = new Date();
    return this.view();
  }

  view(): AccessRulesView {
    return {
      file: this.path,
      loadedAt: this.loadedAt?.toISOString() ?? null,
      rules:
        this.rules?.rules.map(({ identity, exportGlob, grant, line }) => ({
          identity,
          export: exportGlob,
          grant,
          line,
        })) ?? null,
    };
  }
}

async function readRules(path: string): Promise<AccessRules> {
  let text: string;
  try {
    const handle = await open(path, "r");
    try {
      // One byte over the limit tells a file that is too large from one that is exactly at it.
      const buffer = Buffer.alloc(accessFileBytesMax + 1);
      let bytesRead = 0;
      while (bytesRead < buffer.byteLength) {
        const chunk = await handle.read(buffer, bytesRead, buffer.byteLength - bytesRead, bytesRead);
        if (chunk.bytesRead === 0) break;
        bytesRead += chunk.bytesRead;
      }
      if (bytesRead > accessFileBytesMax) {
        throw new BlockError("EINVAL", `${path}: larger than ${accessFileBytesMax} bytes`);
      }
      text = buffer.subarray(0, bytesRead).toString("utf8");
    } finally {
      await handle.close();
    }
  } catch (error) {
    if (error instanceof BlockError) throw error;
    throw new BlockError("ENOENT", `cannot read the access file ${path}: ${(error as Error).message}`, {
      cause: error,
    });
  }
  return parseAccessRules(text, path);
}
