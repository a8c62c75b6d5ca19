/** Messages between codec-pool.ts and codec-worker.ts. */
import type { Errno } from "../block/errors.js";
import type { CodecKeys } from "./chunk-codec.js";

export interface CodecWorkerData {
  readonly keys: CodecKeys | null;
  readonly plainLengthMax: number;
}

export type CodecRequest =
  | { readonly seq: number; readonly op: "encode"; readonly plain: Uint8Array }
  | {
      readonly seq: number;
      readonly op: "decode";
      readonly stored: Uint8Array;
      readonly name: string;
      readonly expectedId: string | null;
    }
  | {
      /** `plain` and `out` are views of SharedArrayBuffers (chunk-slots.ts): nothing is copied or moved. */
      readonly seq: number;
      readonly op: "encodeInto";
      readonly plain: Uint8Array;
      readonly out: Uint8Array;
    }
  | {
      readonly seq: number;
      readonly op: "decodeInto";
      readonly stored: Uint8Array;
      readonly out: Uint8Array;
      readonly name: string;
      readonly expectedId: string | null;
    }
  | { readonly seq: number; readonly op: "check"; readonly stored: Uint8Array; readonly name: string }
  | { readonly seq: number; readonly op: "zeroId"; readonly lengthBytes: number };

export type CodecResponse =
  | {
      readonly seq: number;
      readonly ok: true;
      readonly id?: string;
      readonly stored?: Uint8Array | null;
      readonly plain?: Uint8Array;
      /** encodeInto: the stored length in `out` (null: an all-zero chunk, stored as nothing). */
      readonly storedLength?: number | null;
      /** decodeInto: the plain length in `out`. */
      readonly plainLength?: number;
    }
  | { readonly seq: number; readonly ok: false; readonly errno: Errno; readonly message: string };
