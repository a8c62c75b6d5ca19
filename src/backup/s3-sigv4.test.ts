/**
 * The SigV4 signer against the worked examples of the S3 documentation (header-based authentication with
 * the documented example key and the date 2013-05-24), plus the parsing of s3:// locations and of the
 * shared credentials file.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { loadS3Credentials, s3EndpointFrom } from "./s3-credentials.js";
import { emptyPayloadSha256, signRequest, uriEncode } from "./s3-sigv4.js";
import { parseS3Location } from "./s3-store.js";

const exampleCredentials = {
  accessKeyId: "AKIAIOSFODNN7EXAMPLE",
  secretAccessKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
};
const exampleDate = new Date("2013-05-24T00:00:00Z");

function signatureOf(url: string, headers: Record<string, string>): string {
  const signed = signRequest({
    method: "GET",
    url: new URL(url),
    headers,
    payloadSha256: emptyPayloadSha256,
    credentials: exampleCredentials,
    region: "us-east-1",
    now: exampleDate,
  });
  assert.equal(signed["x-amz-date"], "20130524T000000Z");
  return /Signature=([0-9a-f]{64})$/.exec(signed.authorization ?? "")?.[1] ?? "";
}

void test("GET object with a range header: the documented signature", () => {
  assert.equal(
    signatureOf("https://examplebucket.s3.amazonaws.com/test.txt", { range: "bytes=0-9" }),
    "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
  );
});

void test("GET bucket lifecycle (a query name without a value): the documented signature", () => {
  assert.equal(
    signatureOf("https://examplebucket.s3.amazonaws.com/?lifecycle", {}),
    "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
  );
});

void test("list objects (sorted query parameters): the documented signature", () => {
  assert.equal(
    signatureOf("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J", {}),
    "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
  );
});

void test("URI encoding keeps unreserved characters and, in paths, slashes", () => {
  assert.equal(uriEncode("a b/c~d_e.f-g", true), "a%20b/c~d_e.f-g");
  assert.equal(uriEncode("a/b=c", false), "a%2Fb%3Dc");
  assert.equal(uriEncode("é", false), "%C3%A9");
});

void test("s3:// locations: bucket rules, prefix normalised, bad input refused", () => {
  assert.deepEqual(parseS3Location("s3://my-bucket"), { bucket: "my-bucket", prefix: "" });
  assert.deepEqual(parseS3Location("s3://my-bucket/hosts/a/"), { bucket: "my-bucket", prefix: "hosts/a/" });
  for (const bad of ["s3://", "s3://AB/x", "s3://a_b/x", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"])
    assert.throws(() => parseS3Location(bad), BlockError, bad);
  assert.equal(s3EndpointFrom("http://127.0.0.1:8080/", "us-east-1", {}), "http://127.0.0.1:8080");
  assert.equal(s3EndpointFrom(undefined, "eu-west-1", {}), "https://s3.eu-west-1.amazonaws.com");
  assert.throws(() => s3EndpointFrom("ftp://x", "us-east-1", {}), /http/);
});

void test("credentials: the environment first, then the profile of the shared file", async () => {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-s3-credentials-"));
  try {
    const file = join(directory, "credentials");
    await writeFile(
      file,
      "[default]\naws_access_key_id = DEFAULTKEY\naws_secret_access_key = defaultsecret\n\n# a comment\n[host-b]\naws_access_key_id=BKEY\naws_secret_access_key=bsecret\naws_session_token=btoken\n",
    );
    const fromEnv = await loadS3Credentials({
      AWS_ACCESS_KEY_ID: "ENVKEY",
      AWS_SECRET_ACCESS_KEY: "envsecret",
      AWS_SHARED_CREDENTIALS_FILE: file,
    });
    assert.deepEqual(fromEnv, {
      accessKeyId: "ENVKEY",
      secretAccessKey: "envsecret",
      sessionToken: undefined,
    });
    const fromDefault = await loadS3Credentials({ AWS_SHARED_CREDENTIALS_FILE: file });
    assert.equal(fromDefault.accessKeyId, "DEFAULTKEY");
    const fromProfile = await loadS3Credentials({ AWS_SHARED_CREDENTIALS_FILE: file, AWS_PROFILE: "host-b" });
    assert.deepEqual(fromProfile, {
      accessKeyId: "BKEY",
      secretAccessKey: "bsecret",
      sessionToken: "btoken",
    });
    await assert.rejects(
      loadS3Credentials({ AWS_SHARED_CREDENTIALS_FILE: file, AWS_PROFILE: "nope" }),
      /No S3 credentials in profile \[nope\]/,
    );
    await assert.rejects(
      loadS3Credentials({ AWS_SHARED_CREDENTIALS_FILE: join(directory, "absent") }),
      /No S3 credentials: set AWS_ACCESS_KEY_ID/,
    );
  } finally {
    await rm(directory, { recursive: true, force: true });
  }
});
