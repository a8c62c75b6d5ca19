#!/bin/sh
# Builds the C FUSE peer of bench/fuse/fuse-bench.ts outside the repository: libfuse's
# example/passthrough_hp.cc (multithreaded, low-level API) from a libfuse source tree at the tag of the
# installed libfuse3-dev (Debian 12: fuse-3.14.0), with two changes so that it serves the benchmark's file
# the way blocksnap's FUSE face does:
#   - the backing file is opened without O_DIRECT (the loop device opens the FUSE file with O_DIRECT and
#     passthrough_hp forwards the flag; ours reads through the page cache, so would the peer);
#   - files are opened with FOPEN_DIRECT_IO (fi->direct_io), as ours are: no page cache on the FUSE file
#     and no GETATTR before each read when attributes are not cached (--nocache).
# Usage: bench/fuse/build-c-peer.sh LIBFUSE_SOURCE_DIR [OUTPUT]   (default /tmp/fuse3-peer/passthrough_hp)
# Needs g++ and libfuse3-dev (pkg-config fuse3).
set -eu
source_dir=${1:?usage: build-c-peer.sh LIBFUSE_SOURCE_DIR [OUTPUT]}
output=${2:-/tmp/fuse3-peer/passthrough_hp}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$source_dir/example/passthrough_hp.cc" "$source_dir/example/cxxopts.hpp" "$work/"
sed -i 's/open(buf, fi->flags & ~O_NOFOLLOW)/open(buf, fi->flags \& ~(O_NOFOLLOW | O_DIRECT))/' "$work/passthrough_hp.cc"
sed -i 's/^    fi->noflush = (fs.timeout == 0/    fi->direct_io = 1;\n&/' "$work/passthrough_hp.cc"
# Both edits must have applied: another libfuse version needs them re-done by hand.
grep -q 'O_NOFOLLOW | O_DIRECT' "$work/passthrough_hp.cc"
grep -q 'fi->direct_io = 1;' "$work/passthrough_hp.cc"
mkdir -p "$(dirname "$output")"
# shellcheck disable=SC2046
g++ -O2 -std=c++17 $(pkg-config --cflags fuse3) "$work/passthrough_hp.cc" -o "$output" $(pkg-config --libs fuse3)
echo "$output"
