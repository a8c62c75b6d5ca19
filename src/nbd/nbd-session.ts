/**
 * What the handshake hands to the transmission phase: the export a connection is bound to and everything
 * that was negotiated. Immutable once the transmission starts (NBD has no renegotiation without TLS).
 */
import type { BlockDevice } from "../block/device.js";
import type { MetaContext } from "./export-meta-contexts.js";

/** An export's own metadata context selected by SET_META_CONTEXT, with its per-connection id. */
export interface SelectedMetaContext {
  readonly id: number;
  readonly context: MetaContext;
}

export interface NbdSession {
  readonly exportName: string;
  /** The export's device, already a CheckedDevice. */
  readonly device: BlockDevice;
  readonly sizeBytes: number;
  /** Writes, trims and zeroes are refused with EPERM (the export's readOnly or a device that cannot write). */
  readonly isReadOnly: boolean;
  /** The NBD_FLAG_* transmission flags sent to the client: what we advertised is what we accept. */
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  /** Id of the selected base:allocation context, 0 when none was selected for this export. */
  readonly baseAllocationContextId: number;
  /** The export's other selected contexts, in the order their BLOCK_STATUS chunks are sent (after base). */
  readonly metaContexts: readonly SelectedMetaContext[];
  /** Largest READ/WRITE payload (advertised as the maximum block size). */
  readonly requestLengthBytesMax: number;
}
