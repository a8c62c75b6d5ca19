import assert from "node:assert/strict";
import { test } from "node:test";
import { parseMountInfo } from "./mount-info.js";

test("parseMountInfo reads device numbers, escaped mount points, types and sources", () => {
  const text = [
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
    "42 22 0:39 / /var/lib/blocksnap/my\\040mnt rw,nosuid,nodev,relatime shared:7 master:3 - fuse.blocksnap blocksnap rw,user_id=0",
    "43 22 259:3 / /big rw - xfs /dev/nvme0n1p3 rw",
    "garbage line",
    "",
  ].join("\n");
  const entries = parseMountInfo(text);
  assert.equal(entries.length, 3);
  assert.deepEqual(entries[1], {
    mountId: 42,
    majorMinor: "0:39",
    deviceNumber: 39,
    mountPoint: "/var/lib/blocksnap/my mnt",
    fsType: "fuse.blocksnap",
    source: "blocksnap",
  });
  assert.equal(entries[0]?.deviceNumber, 8 * 2 ** 20 + 1);
  assert.equal(entries[2]?.deviceNumber, 259 * 2 ** 20 + 3);
});

test("parseMountInfo reads mount points with escaped spaces", () => {
  const text = "36 35 7:3 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/loop3 rw\n";
  assert.deepEqual(parseMountInfo(text), [
    {
      mountId: 36,
      majorMinor: "7:3",
      deviceNumber: 7 * 2 ** 20 + 3,
      mountPoint: "/mnt/with space",
      fsType: "ext4",
      source: "/dev/loop3",
    },
  ]);
});
