/**
 * The FUSE kernel ABI as far as blocksnap speaks it (include/uapi/linux/fuse.h, protocol 7.x): opcodes,
 * flags and the byte layout of the structures we read and write. Every structure is little-endian on the
 * machines we run on (x86-64, arm64) and padded to 8 bytes by the header itself, so fixed offsets suffice.
 *
 * Names keep the kernel header's spelling so that a reader can grep the header for them. Only what the
 * server uses is here; the rest of the header (CUSE, DAX mappings, other notifications) is left out.
 */

export const FUSE_KERNEL_VERSION = 7;
/**
 * The highest minor we implement: 7.36 brings FOPEN_PARALLEL_DIRECT_WRITES and flags2 (FUSE_INIT_EXT),
 * which we do not request. We answer min(kernel minor, this).
 */
export const FUSE_KERNEL_MINOR_IMPLEMENTED = 36;
/** Oldest kernel minor we accept: 7.28 gave FUSE_MAX_PAGES (large requests), Linux 4.20. */
export const FUSE_KERNEL_MINOR_MIN = 28;
export const FUSE_ROOT_ID = 1n;

// enum fuse_notify_code: requests read but not answered go back to the queue (7.40, Linux 6.9).
export const FUSE_NOTIFY_RESEND = 7;

// enum fuse_opcode
export const FUSE_LOOKUP = 1;
export const FUSE_FORGET = 2;
export const FUSE_GETATTR = 3;
export const FUSE_SETATTR = 4;
export const FUSE_OPEN = 14;
export const FUSE_READ = 15;
export const FUSE_WRITE = 16;
export const FUSE_STATFS = 17;
export const FUSE_RELEASE = 18;
export const FUSE_FSYNC = 20;
export const FUSE_FLUSH = 25;
export const FUSE_INIT = 26;
export const FUSE_OPENDIR = 27;
export const FUSE_READDIR = 28;
export const FUSE_RELEASEDIR = 29;
export const FUSE_FSYNCDIR = 30;
export const FUSE_ACCESS = 34;
export const FUSE_INTERRUPT = 36;
export const FUSE_DESTROY = 38;
export const FUSE_BATCH_FORGET = 42;
export const FUSE_FALLOCATE = 43;

// fuse_init_in/out flags
export const FUSE_ASYNC_READ = 1 << 0;
export const FUSE_BIG_WRITES = 1 << 5;
export const FUSE_ASYNC_DIO = 1 << 15;
export const FUSE_PARALLEL_DIROPS = 1 << 18;
export const FUSE_MAX_PAGES = 1 << 22;

// fuse_open_out.open_flags
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

// fuse_setattr_in.valid
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;

// fuse_getattr_in.getattr_flags
export const FUSE_GETATTR_FH = 1 << 0;

// fallocate(2) modes, as FUSE_FALLOCATE passes them through
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

// access(2) mask bits
export const W_OK = 2;

// d_type values in fuse_dirent.type
export const DT_DIR = 4;
export const DT_REG = 8;

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;

/** struct fuse_in_header: len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid u32, extlen u16, pad. */
export const FUSE_IN_HEADER_BYTES = 40;
/** struct fuse_out_header: len u32, error i32, unique u64. */
export const FUSE_OUT_HEADER_BYTES = 16;
export const FUSE_INIT_IN_BYTES_MIN = 16;
export const FUSE_INIT_OUT_BYTES = 64;
export const FUSE_ATTR_BYTES = 88;
/** struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid (u64), two u32 nsec, fuse_attr. */
export const FUSE_ENTRY_OUT_BYTES = 40 + FUSE_ATTR_BYTES;
/** struct fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, fuse_attr. */
export const FUSE_ATTR_OUT_BYTES = 16 + FUSE_ATTR_BYTES;
export const FUSE_OPEN_OUT_BYTES = 16;
export const FUSE_READ_IN_BYTES = 40;
export const FUSE_WRITE_IN_BYTES = 40;
export const FUSE_WRITE_OUT_BYTES = 8;
export const FUSE_STATFS_OUT_BYTES = 80;
export const FUSE_SETATTR_IN_BYTES = 88;
export const FUSE_FALLOCATE_IN_BYTES = 32;
export const FUSE_FORGET_ONE_BYTES = 16;
/** struct fuse_dirent without its name: ino u64, off u64, namelen u32, type u32. */
export const FUSE_NAME_OFFSET = 24;
/** The kernel refuses reads of /dev/fuse into smaller buffers. */
export const FUSE_MIN_READ_BUFFER = 8192;

/** FUSE_REC_ALIGN: variable-length records are padded to 8 bytes. */
export function fuseRecordAlign(lengthBytes: number): number {
  return (lengthBytes + 7) & ~7;
}
