// The SDK against a running Corral, through Envoy, from Node:
//   CORRAL_URL=http://127.0.0.1:8080 CORRAL_EMAIL=... CORRAL_PASSWORD=... npm test
// (tests/web/test_ts_sdk.py brings the stack up and runs this; without CORRAL_URL it skips.)
// Log in (public), create a session, send a scripted message, read the streamed answer; then
// cut the connection mid-turn and check the stream resumes by sequence: every event once.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { TcpProxy } from "./tcp-proxy.mjs";
import { createCorral } from "../dist/index.js";

const url = process.env.CORRAL_URL;
const email = process.env.CORRAL_EMAIL;
const password = process.env.CORRAL_PASSWORD;
const skip = url && email && password ? false : "set CORRAL_URL, CORRAL_EMAIL and CORRAL_PASSWORD";

const script = (steps) => `<<corral-model ${JSON.stringify(steps)}>>`;
let token = "";


before(async () => {
  if (skip) return;
  const corral = createCorral({ baseUrl: url });
  const reply = await corral.identity.login({ email, password });
  token = reply.token?.accessToken ?? "";
  assert.ok(token, "login returns an access token");
  assert.equal(reply.user?.email, email);
});

async function newSession(corral, displayName) {
  const { session } = await corral.session.createSession({
    session: { displayName },
    requestId: crypto.randomUUID(),
  });
  assert.match(session.name, /^sessions\//);
  return session.name;
}

/** Events of the next turn, from the start, until its turn_result. */
async function collectTurn(corral, name, options = {}) {
  const events = [];
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 60_000);
  try {
    for await (const event of corral.streamSessionEvents(name, { ...options, signal: controller.signal })) {
      events.push(event);
      options.onEvent?.(event, events);
      if (event.payload.case === "turnResult") break;
    }
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
  return events;
}

const textOf = (events) =>
  events.filter((e) => e.payload.case === "textDelta").map((e) => e.payload.value.text).join("");

test("log in, create a session, send a message, read the streamed answer", { skip }, async () => {
  const corral = createCorral({ baseUrl: url, getToken: () => token });
  const name = await newSession(corral, "ts-sdk test");
  const streamed = collectTurn(corral, name);
  const sent = await corral.session.sendMessage({
    session: name,
    text: script([{ text: "Hello from the TypeScript SDK", chunk: 5 }]),
    requestId: crypto.randomUUID(),
  });
  assert.match(sent.turn.name, new RegExp(`^${name}/turns/`));
  const events = await streamed;
  assert.equal(textOf(events), "Hello from the TypeScript SDK");
  assert.ok(events.filter((e) => e.payload.case === "textDelta").length >= 5, "streamed in deltas");
  const kinds = events.map((e) => e.payload.case);
  assert.equal(kinds[0], "userMessage");
  assert.ok(kinds.includes("turnStarted"));
  const result = events.at(-1).payload.value;
  assert.equal(result.status, 1 /* STATUS_SUCCEEDED */);
  const sequences = events.map((e) => Number(e.sequence));
  assert.deepEqual(sequences, sequences.map((_, i) => i + 1), "sequences 1..n, in order");

  const { session } = await corral.session.getSession({ name });
  assert.ok(session.usage.outputTokens > 0n, "usage is reported on the session");
});

test("a stream cut mid-turn resumes from the last sequence: every event exactly once", { skip }, async () => {
  const proxy = new TcpProxy(url);
  await proxy.listen();
  after(() => proxy.close());
  const corral = createCorral({ baseUrl: proxy.url, getToken: () => token });
  const direct = createCorral({ baseUrl: url, getToken: () => token });
  const name = await newSession(direct, "ts-sdk resume test");
  const words = Array.from({ length: 24 }, (_, i) => `w${i} `).join("");
  const states = [];
  let cutAt = 0;
  const streamed = collectTurn(corral, name, {
    initialBackoffMs: 100,
    onState: (state) => states.push(state),
    onEvent: (event, events) => {
      if (!cutAt && event.payload.case === "textDelta" && events.length > 4) {
        cutAt = Number(event.sequence);
        proxy.cut();
        setTimeout(() => proxy.restore(), 1000); // the turn goes on meanwhile
      }
    },
  });
  await direct.session.sendMessage({
    session: name,
    text: script([{ text: words, chunk: 4, delay: 0.1 }]),
    requestId: crypto.randomUUID(),
  });
  const events = await streamed;
  assert.ok(cutAt > 0, "the connection was cut mid-turn");
  assert.ok(states.includes("reconnecting"), `states: ${states}`);
  assert.equal(textOf(events), words, "no delta lost or repeated");
  const sequences = events.map((e) => Number(e.sequence));
  assert.deepEqual(sequences, sequences.map((_, i) => i + 1), "every event once, in order");
  assert.ok(events.every((e) => e.payload.case !== "heartbeat"));
});
