/**
 * TLS for the NBD face (NBD_OPT_STARTTLS), with Node's own `tls` module: X.509 (a certificate and key,
 * optionally a CA whose client certificates are required with verify-peer) and PSK (psktool's key file,
 * `identity:hexkey` per line, as nbdkit's --tls-psk and qemu's tls-creds-psk read it). Either or both.
 *
 * Modes (serve --tls): `off` (STARTTLS refused with NBD_REP_ERR_POLICY), `on` (TLS when the client asks),
 * `require` (every option but STARTTLS and ABORT answered NBD_REP_ERR_TLS_REQD until TLS is up; handshake.ts).
 * The upgrade itself: the connection stops reading the plain socket before it acknowledges STARTTLS, so
 * the client's ClientHello is read by the TLS layer only (nbd-connection.ts).
 *
 * The client's identity for the access rules (access-rules.ts): the PSK identity whose key completed the
 * handshake, or the CN of a client certificate that --tls-verify-peer verified; null otherwise (an
 * unverified certificate names nobody).
 *
 * Not done: reloading credentials without a restart.
 */
import { readFile } from "node:fs/promises";
import type { Socket } from "node:net";
import * as tls from "node:tls";
import { BlockError } from "../block/errors.js";

export type TlsMode = "off" | "on" | "require";

export interface NbdTls {
  readonly mode: TlsMode;
  /** null with mode off. */
  readonly context: tls.SecureContext | null;
  readonly psk: ReadonlyMap<string, Buffer> | null;
  /** A server certificate was given (X.509 credentials). */
  readonly x509: boolean;
  readonly verifyPeer: boolean;
}

export interface TlsFiles {
  readonly mode?: TlsMode | undefined;
  readonly certFile?: string | undefined;
  readonly keyFile?: string | undefined;
  readonly caFile?: string | undefined;
  readonly verifyPeer?: boolean | undefined;
  readonly pskFile?: string | undefined;
}

export const tlsOff: NbdTls = { mode: "off", context: null, psk: null, x509: false, verifyPeer: false };

/** PSK ciphers for TLS 1.2 (what Node offers PSK with) plus the usual certificate ones. */
const pskCiphers = "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:PSK";

/** psktool's format: `identity:hexkey` per line; `#` comments and blank lines ignored. */
export function parsePskFile(text: string, path: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const [index, rawLine] of text.split("\n").entries()) {
    const line = rawLine.trim();
    if (line === "" || line.startsWith("#")) continue;
    const colon = line.lastIndexOf(":");
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new BlockError("EINVAL", `${path}:${index + 1}: expected identity:hexkey (psktool format)`);
    }
    keys.set(identity, Buffer.from(hex, "hex"));
  }
  if (keys.size === 0) throw new BlockError("EINVAL", `${path}: no PSK keys`);
  return keys;
}

async function readText(path: string, what: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (error) {
    throw new BlockError("ENOENT", `cannot read the TLS ${what} ${path}: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/** The TLS set-up for serve's flags: `require` by default when credentials are given, else off. */
export async function loadNbdTls(files: TlsFiles): Promise<NbdTls> {
  const hasCert = files.certFile !== undefined || files.keyFile !== undefined;
  const hasPsk = files.pskFile !== undefined;
  const mode = files.mode ?? (hasCert || hasPsk ? "require" : "off");
  if (mode === "off") return tlsOff;
  if (!hasCert && !hasPsk) {
    throw new BlockError("EINVAL", `--tls ${mode} needs credentials: --tls-cert and --tls-key, or --tls-psk`);
  }
  if (hasCert && (files.certFile === undefined || files.keyFile === undefined)) {
    throw new BlockError("EINVAL", "--tls-cert and --tls-key go together");
  }
  if (files.verifyPeer === true && files.caFile === undefined) {
    throw new BlockError(
      "EINVAL",
      "--tls-verify-peer needs --tls-ca (the CA that signs client certificates)",
    );
  }
  const psk = hasPsk ? parsePskFile(await readText(files.pskFile!, "PSK file"), files.pskFile!) : null;
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({
      ...(hasCert
        ? {
            cert: await readText(files.certFile!, "certificate"),
            key: await readText(files.keyFile!, "key"),
          }
        : {}),
      ...(files.caFile === undefined ? {} : { ca: await readText(files.caFile, "CA") }),
      ...(psk === null ? {} : { ciphers: `${hasCert ? `${tls.DEFAULT_CIPHERS}:` : ""}${pskCiphers}` }),
      // TLS 1.3 in Node has no PSK key exchange: with PSK credentials clients negotiate TLS 1.2.
      ...(psk !== null && !hasCert ? { maxVersion: "TLSv1.2" as const } : {}),
    });
  } catch (error) {
    throw new BlockError("EINVAL", `TLS credentials: ${(error as Error).message}`, { cause: error });
  }
  return { mode, context, psk, x509: hasCert, verifyPeer: files.verifyPeer === true };
}

/** peerIdentity()'s answer for a client certificate that did not verify (no PSK identity can equal it). */
export const untrustedPeer: unique symbol = Symbol("untrusted peer");

/** The PSK identity each server socket's handshake used, recorded by its pskCallback. */
const pskIdentities = new WeakMap<tls.TLSSocket, string>();

/** Wraps an accepted plain socket after STARTTLS was acknowledged. */
export function serverTlsSocket(socket: Socket, config: NbdTls): tls.TLSSocket {
  if (config.context === null) throw new BlockError("EINVAL", "TLS is off");
  const psk = config.psk;
  const secure: tls.TLSSocket = new tls.TLSSocket(socket, {
    isServer: true,
    secureContext: config.context,
    requestCert: config.verifyPeer,
    rejectUnauthorized: config.verifyPeer,
    ...(psk === null
      ? {}
      : {
          pskCallback: (_socket: tls.TLSSocket, identity: string) => {
            const key = psk.get(identity) ?? null;
            if (key !== null) pskIdentities.set(secure, identity);
            return key;
          },
        }),
  });
  return secure;
}

/**
 * After 'secure': who the client is (see the notes above), null for nobody, or `untrusted` when
 * --tls-verify-peer is on and the client's certificate does not verify against --tls-ca (the connection
 * must then end: untrustedPeer). A client that used a PSK key is authenticated by it and needs no certificate.
 */
export function peerIdentity(secure: tls.TLSSocket, config: NbdTls): string | null | typeof untrustedPeer {
  const pskIdentity = pskIdentities.get(secure);
  if (pskIdentity !== undefined) return pskIdentity;
  if (!config.verifyPeer) return null;
  if (!isPeerCertificateVerified(secure)) return untrustedPeer;
  const commonName = secure.getPeerCertificate()?.subject?.CN;
  return typeof commonName === "string" && commonName !== "" ? commonName : null;
}

/**
 * Node checks a client certificate's chain (and sets `authorized`) only on sockets a tls.Server made; it
 * asks OpenSSL for the verification result and only refuses once the handshake is done. Our TLSSocket is
 * made by hand over an accepted socket after STARTTLS, so no such check runs and `authorized` stays
 * false: without this function, a certificate from any CA would be accepted. We ask OpenSSL the same
 * question Node does, through the same handle, and fail closed if that handle ever changes shape.
 */
function isPeerCertificateVerified(secure: tls.TLSSocket): boolean {
  const handle = (secure as unknown as { _handle?: { verifyError?: () => Error | null | undefined } })
    ._handle;
  if (typeof handle?.verifyError !== "function") return false;
  const certificate = secure.getPeerCertificate();
  const hasCertificate = certificate !== null && Object.keys(certificate).length > 0;
  return hasCertificate && (handle.verifyError() ?? null) === null;
}
