# libnbd conformance smoke (docs/design/nbd-notes.md), run by libnbd-smoke.test.ts with Debian's
# python3-libnbd: /usr/bin/python3 smoke.py URI [structured...]. Every line starts with "ok", "note", "==",
# "export" or "context"; a line starting with "FAIL" (or an uncaught exception) is a failed check.
import errno
import sys

import nbd


def conn(uri, sr=True):
    h = nbd.NBD()
    h.set_request_structured_replies(sr)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    h.set_strict_mode(0)  # strict off: bad requests reach the server
    return h


def expect_err(name, fn, want):
    try:
        fn()
        print("FAIL %-28s succeeded, wanted %s" % (name, want))
    except nbd.Error as e:
        ok = e.errnum in want
        print("%s %-28s errno=%s" % ("ok  " if ok else "FAIL", name, errno.errorcode.get(e.errnum)))


uri = sys.argv[1]
modes = [m == "structured" for m in sys.argv[2:]] or [True, False]
for sr in modes:
    h = conn(uri, sr)
    sz = h.get_size()
    buf = b"\xa5" * 65536
    negotiated = h.get_structured_replies_negotiated()
    print("== structured=%s size=%d ro=%s flush=%s fua=%s trim=%s zero=%s df=%s mc=%s" % (
        negotiated, sz, h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(),
        h.can_df(), h.can_multi_conn()))
    if bool(negotiated) != sr:
        print("FAIL structured replies negotiated=%s, requested %s" % (negotiated, sr))
    if not h.is_read_only():
        h.pwrite(buf, 4096)
        assert h.pread(65536, 4096) == buf
        h.pwrite(b"\x01" * 512, sz - 512)
        assert h.pread(512, sz - 512) == b"\x01" * 512
        print("ok   write/read round trip and last sector")
        if h.can_zero():
            h.zero(65536, 4096)
            assert h.pread(65536, 4096) == bytes(65536)
            print("ok   write zeroes reads back as zero")
        if h.can_fua():
            h.pwrite(buf, 0, nbd.CMD_FLAG_FUA)
            print("ok   FUA write")
        if h.can_flush():
            h.flush()
            print("ok   flush")
        if h.can_trim():
            h.trim(65536, 1 << 20)
            print("ok   trim")
        expect_err("write past end", lambda: h.pwrite(b"x" * 512, sz), (errno.ENOSPC, errno.EINVAL))
        expect_err("write straddling end", lambda: h.pwrite(b"x" * 1024, sz - 512), (errno.ENOSPC, errno.EINVAL))
    else:
        expect_err("write on read-only", lambda: h.pwrite(b"x" * 512, 0), (errno.EPERM,))
    expect_err("read past end", lambda: h.pread(512, sz), (errno.EINVAL,))
    expect_err("read straddling end", lambda: h.pread(1024, sz - 512), (errno.EINVAL,))
    expect_err("read offset 2^63", lambda: h.pread(512, 1 << 63), (errno.EINVAL,))
    expect_err("read offset 2^53", lambda: h.pread(512, 1 << 53), (errno.EINVAL,))
    try:
        h.pread(0, 0)
        print("note zero-length read accepted")
    except nbd.Error as e:
        print("note zero-length read -> %s" % errno.errorcode.get(e.errnum))
    expect_err("REQ_ONE flag on READ", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), (errno.EINVAL,))
    if sr and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        ext = []
        h.block_status(sz, 0, lambda ctx, off, e, err: ext.append((ctx, list(e))) or 0)
        if not ext or ext[0][0] != nbd.CONTEXT_BASE_ALLOCATION or sum(ext[0][1][0::2]) != sz:
            print("FAIL block_status %r" % (ext[:1],))
        else:
            print("ok   block_status", ext[0][0], ext[0][1][:8])
        expect_err("block_status past end", lambda: h.block_status(512, sz, lambda *a: 0), (errno.EINVAL,))
    elif sr:
        print("FAIL base:allocation was not negotiated")
    h.shutdown()  # NBD_CMD_DISC
    print("ok   disconnect")

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_list(lambda n, d: print("export %r %r" % (n, d)) or 0)
h.opt_list_meta_context(lambda n: print("context", n) or 0)
h.set_export_name("no-such-export")
try:
    h.opt_info()
    print("FAIL OPT_INFO unknown export accepted")
except nbd.Error as e:
    print("ok   OPT_INFO unknown export errno=%s" % errno.errorcode.get(e.errnum))
h.opt_abort()
print("ok   done")
