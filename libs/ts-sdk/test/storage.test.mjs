// The SDK's file transfers against a running Corral, through Envoy, from Node:
//   CORRAL_URL=... CORRAL_EMAIL=... CORRAL_PASSWORD=... CORRAL_WORKSPACE=workspaces/... npm test
// (tests/web/test_ts_sdk.py brings the stack up, makes a workspace owned by the signed-in user
// and runs this; without those variables it skips.) Uploads small and chunked files, survives
// failed and half-answered chunk calls and a download stream broken mid-file, and checks every
// byte by SHA-256 on both sides.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { before, test } from "node:test";

import { Code, ConnectError, createCorral, sha256Hex } from "../dist/index.js";

const url = process.env.CORRAL_URL;
const email = process.env.CORRAL_EMAIL;
const password = process.env.CORRAL_PASSWORD;
const workspace = process.env.CORRAL_WORKSPACE;
const skip =
  url && email && password && workspace
    ? false
    : "set CORRAL_URL, CORRAL_EMAIL, CORRAL_PASSWORD and CORRAL_WORKSPACE";
const MiB = 1024 * 1024;
let token = "";

before(async () => {
  if (skip) return;
  const reply = await createCorral({ baseUrl: url }).identity.login({ email, password });
  token = reply.token?.accessToken ?? "";
  assert.ok(token);
});

const hex = (bytes) => createHash("sha256").update(bytes).digest("hex");
const method = (input) => String(input instanceof Request ? input.url : input).split("/").pop();

/** A client whose fetch goes through `wrap(fetch, input, init)` (a faulty network). */
function client(wrap) {
  const fetch = wrap ? (input, init) => wrap(globalThis.fetch, input, init) : undefined;
  return createCorral({ baseUrl: url, token, fetch });
}

async function bytesOf(corral, name) {
  const { file, blob } = await corral.downloadFile(name);
  return { file, bytes: new Uint8Array(await blob.arrayBuffer()) };
}

test("a small file goes in one WriteFile call and comes back byte for byte", { skip }, async () => {
  const calls = [];
  const corral = client((fetch, input, init) => (calls.push(method(input)), fetch(input, init)));
  const data = new TextEncoder().encode("hello from the SDK\n");
  const progress = [];
  const file = await corral.uploadFile(workspace, "sdk/small.txt", new Blob([data], { type: "text/plain" }), {
    onProgress: (done, total) => progress.push([done, total]),
  });
  assert.deepEqual(calls, ["WriteFile"]);
  assert.equal(file.path, "sdk/small.txt");
  assert.equal(Number(file.sizeBytes), data.length);
  assert.equal(file.sha256, hex(data));
  assert.equal(file.contentType, "text/plain");
  assert.deepEqual(progress.at(-1), [data.length, data.length]);
  const back = await bytesOf(corral, file.name);
  assert.deepEqual(back.bytes, data);

  // Not over an existing file unless asked to, and never into a workspace one cannot see.
  await assert.rejects(corral.uploadFile(workspace, "sdk/small.txt", data), (e) => {
    return ConnectError.from(e).code === Code.AlreadyExists;
  });
  await assert.rejects(corral.uploadFile("workspaces/nobody-has-this-one", "x.txt", data), (e) => {
    return ConnectError.from(e).code === Code.NotFound;
  });
  const replaced = await corral.uploadFile(workspace, "sdk/small.txt", new Uint8Array([1, 2]), {
    overwrite: true,
  });
  assert.equal(Number(replaced.sizeBytes), 2);
});

test("a 9 MiB file goes in chunks with progress, checked by SHA-256", { skip }, async () => {
  const calls = [];
  const corral = client((fetch, input, init) => (calls.push(method(input)), fetch(input, init)));
  const data = randomBytes(9 * MiB + 12345);
  const progress = [];
  const file = await corral.uploadFile(workspace, "sdk/big.bin", data, {
    chunkSize: 2 * MiB,
    onProgress: (done) => progress.push(done),
  });
  assert.equal(calls[0], "CreateUpload");
  assert.equal(calls.filter((c) => c === "AppendUploadChunk").length, 5);
  assert.equal(calls.at(-1), "CommitUpload");
  assert.deepEqual(progress, [0, 2, 4, 6, 8].map((m) => m * MiB).concat([data.length]));
  assert.equal(file.sha256, hex(data));
  assert.equal(file.sha256, await sha256Hex(data));
  const back = await bytesOf(corral, file.name);
  assert.equal(back.bytes.length, data.length);
  assert.equal(hex(back.bytes), hex(data));
});

test("chunks that fail on the way are sent again from where the server is", { skip }, async () => {
  let appends = 0;
  const faults = [];
  const corral = client(async (fetch, input, init) => {
    if (method(input) !== "AppendUploadChunk") return fetch(input, init);
    appends += 1;
    if (appends === 2) {
      // The connection fails before the request leaves: nothing reached the server.
      faults.push("refused");
      throw new TypeError("fetch failed: connection refused");
    }
    if (appends === 4) {
      // The server keeps the chunk but its answer is lost: the retry finds it already there.
      const response = await fetch(input, init);
      await response.arrayBuffer();
      faults.push("answer lost");
      throw new TypeError("fetch failed: connection reset");
    }
    return fetch(input, init);
  });
  const data = randomBytes(5 * MiB + 7);
  const file = await corral.uploadFile(workspace, "sdk/flaky.bin", data, {
    chunkSize: MiB,
    backoffMs: 1,
  });
  assert.deepEqual(faults, ["refused", "answer lost"]);
  assert.equal(file.sha256, hex(data));
  assert.equal(hex((await bytesOf(corral, file.name)).bytes), hex(data));
});

test("a download stream broken mid-file resumes at the bytes received", { skip }, async () => {
  const data = randomBytes(3 * MiB + 99);
  const plain = client();
  const file = await plain.uploadFile(workspace, "sdk/resumed.bin", data);
  const requests = [];
  const corral = client(async (fetch, input, init) => {
    const response = await fetch(input, init);
    if (method(input) !== "DownloadFile") return response;
    requests.push(response);
    if (requests.length > 1) return response;
    // The first stream dies after about 1.5 MiB of the body.
    let passed = 0;
    const body = response.body.pipeThrough(
      new TransformStream({
        transform(chunk, controller) {
          if (passed > 1.5 * MiB) {
            controller.error(new TypeError("network error: connection reset"));
            return;
          }
          passed += chunk.length;
          controller.enqueue(chunk);
        },
      }),
    );
    return new Response(body, { status: response.status, headers: response.headers });
  });
  const progress = [];
  const { file: meta, blob } = await corral.downloadFile(file.name, {
    backoffMs: 1,
    onProgress: (done) => progress.push(done),
  });
  assert.equal(requests.length, 2, "one reconnect");
  assert.equal(meta.sha256, hex(data));
  assert.equal(hex(new Uint8Array(await blob.arrayBuffer())), hex(data));
  assert.ok(progress.some((p) => p > 0 && p < data.length), "progress went through the middle");
  assert.equal(progress.at(-1), data.length);
});
