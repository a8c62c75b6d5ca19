#!/bin/sh
# Builds the C copy-before-write filter for nbdkit (bench/nbd/c-cbw-filter.c), the C reference of
# bench/nbd/cow-bench.ts, outside the repository.
# Usage: bench/nbd/build-c-cbw-filter.sh [OUTPUT]   (default /tmp/blocksnap-c-cbw/c-cbw-filter.so)
# Needs gcc and Debian's nbdkit-plugin-dev (nbdkit-filter.h).
set -eu
here=$(dirname "$0")
output=${1:-/tmp/blocksnap-c-cbw/c-cbw-filter.so}
mkdir -p "$(dirname "$output")"
gcc -O2 -Wall -Wextra -Werror -std=gnu11 -fPIC -shared -pthread "$here/c-cbw-filter.c" -o "$output"
echo "$output"
