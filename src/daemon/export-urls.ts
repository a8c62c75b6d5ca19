/**
 * How clients reach an export: NBD URIs (doc/uri.md of the NBD project: `nbd+unix:///<export>?socket=P`,
 * `nbd://host:port/<export>`) and the FUSE file path. The export name is the URI path without its first
 * `/`; device names and snapshot ids only use characters that need no escaping (`[A-Za-z0-9._-]`, `@`),
 * but paths and names are escaped anyway so that a URI is always valid.
 */
import { join } from "node:path";

export interface ExportAddresses {
  /** The NBD Unix socket, or null when NBD over Unix is off. */
  readonly nbdSocketPath: string | null;
  /** The NBD TCP address actually bound, or null when TCP is off. */
  readonly nbdTcp: { readonly host: string; readonly port: number } | null;
  /** The FUSE mount directory, or null when FUSE is off. */
  readonly fuseMountDir: string | null;
  /** serve --tls require: the URIs are `nbds` ones (the client adds its credentials, e.g. tls-psk-file=). */
  readonly nbdTlsRequired?: boolean;
}

export function nbdUrisFor(exportName: string, addresses: ExportAddresses): string[] {
  const uris: string[] = [];
  const path = escapeUriPart(exportName);
  const scheme = addresses.nbdTlsRequired === true ? "nbds" : "nbd";
  if (addresses.nbdSocketPath !== null) {
    uris.push(`${scheme}+unix:///${path}?socket=${escapeUriPart(addresses.nbdSocketPath)}`);
  }
  if (addresses.nbdTcp !== null) {
    const { host, port } = addresses.nbdTcp;
    const authority = host.includes(":") ? `[${host}]` : host;
    uris.push(`${scheme}://${authority}:${port}/${path}`);
  }
  return uris;
}

export function fusePathFor(exportName: string, addresses: ExportAddresses): string | null {
  return addresses.fuseMountDir === null ? null : join(addresses.fuseMountDir, exportName);
}

/** Percent-encodes every byte outside the unreserved set, keeping `/` and `@` readable. */
function escapeUriPart(text: string): string {
  return encodeURIComponent(text)
    .replaceAll("%2F", "/")
    .replaceAll("%40", "@")
    .replace(/[!'()*]/g, (character) => `%${character.charCodeAt(0).toString(16).toUpperCase()}`);
}
