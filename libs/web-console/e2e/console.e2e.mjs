// The web console end to end in headless Chromium (Debian's, driven by playwright-core), against
// a running Corral: tests/web/test_console.py brings the stack up and runs this with
//   CONSOLE_URL EDGE_URL CORRAL_EMAIL CORRAL_PASSWORD ARTIFACTS CHROMIUM
// Each step prints one line and leaves a screenshot in ARTIFACTS; the first failure exits 1.
import assert from "node:assert/strict";

import { createCorral } from "../../ts-sdk/dist/index.js";
import { TcpProxy } from "../../ts-sdk/test/tcp-proxy.mjs";
import { env, open, script } from "./harness.mjs";

const consoleUrl = env("CONSOLE_URL");
const edgeUrl = env("EDGE_URL");
const email = env("CORRAL_EMAIL");
const password = env("CORRAL_PASSWORD");
const artifacts = env("ARTIFACTS");

const proxy = new TcpProxy(edgeUrl);
await proxy.listen();

const run = await open(artifacts);
const { context, page, pageErrors, screenshot, step } = run;

async function send(text) {
  await page.fill("#message", text);
  await page.click("#send");
}

/** Resolves when the console has rendered the turn_result of the n-th turn (1-based). */
async function turnResult(n) {
  const result = page.locator(".turn-result").nth(n - 1);
  await result.waitFor();
  return result.getAttribute("data-status");
}

try {
  await step("login", async () => {
    // The edge through the proxy (the last step reloads without it: config.json's edge URL).
    await page.goto(`${consoleUrl}/?edge=${encodeURIComponent(proxy.url)}`);
    await page.locator("#login-form").waitFor();
    await page.fill("#login-email", email);
    await page.fill("#login-password", "not the password");
    await page.click("#login-form button[type=submit]");
    await page.locator("#login-error", { hasText: "Wrong email or password" }).waitFor();
    await page.fill("#login-password", password);
    await screenshot("login");
    await page.click("#login-form button[type=submit]");
    await page.locator("#app-view").waitFor({ state: "visible" });
    assert.equal(await page.textContent("#who"), email);
    await screenshot("signed-in");
  });

  await step("create a session", async () => {
    await page.fill("#new-session-name", "browser test");
    await page.selectOption("#new-session-permissions", "ask");
    await page.click("#new-session button[type=submit]");
    await page.locator("#sessions li.selected", { hasText: "browser test" }).waitFor();
    // "connecting…" until the server's first response (no events yet), then "live".
    await page.locator("#connection:is([data-state=connecting], [data-state=live])").waitFor();
    assert.equal(await page.textContent("#session-title"), "browser test");
    await screenshot("session-created");
  });

  await step("text streams in", async () => {
    // Record every value the answer's text takes while it streams.
    await page.evaluate(() => {
      window.snapshots = [];
      new MutationObserver(() => {
        const node = document.querySelector(".assistant-text");
        if (node) window.snapshots.push(node.textContent);
      }).observe(document.getElementById("events"), {
        childList: true,
        subtree: true,
        characterData: true,
      });
    });
    const answer = "Hello from the browser, streamed in small pieces.";
    await send(script([{ text: answer, chunk: 3, delay: 0.08 }]));
    await page.locator(".user-message").first().waitFor();
    await page.locator(".assistant-text[data-streaming=true]").waitFor();
    await screenshot("streaming");
    assert.equal(await turnResult(1), "succeeded");
    assert.equal(await page.textContent(".assistant-text"), answer);
    const snapshots = await page.evaluate(() => window.snapshots);
    const partial = [...new Set(snapshots)].filter((s) => s && s !== answer);
    assert.ok(partial.length >= 5, `text appeared piece by piece: ${JSON.stringify(partial)}`);
    assert.ok(partial.every((s) => answer.startsWith(s)), "every partial text is a prefix");
    await screenshot("streamed");
  });

  await step("a tool request is approved, then the tool runs", async () => {
    await send(
      script([
        { tool: "Bash", input: { command: "echo approved-in-the-browser > approved.txt && cat approved.txt" } },
        { text: "The command ran." },
      ]),
    );
    const request = page.locator(".permission-request").first();
    await request.waitFor();
    assert.match(await request.textContent(), /Allow Bash\?.*approved-in-the-browser/s);
    await screenshot("permission-request");
    await request.locator("button.allow").click();
    await page.locator(".permission-request[data-decision=allow]").waitFor();
    const call = page.locator(".tool-call[data-tool=Bash]").first();
    await call.waitFor();
    const id = await call.getAttribute("data-tool-use-id");
    const result = page.locator(`.tool-result[data-tool-use-id="${id}"]`);
    await result.waitFor();
    assert.equal(await result.textContent(), "↳ approved-in-the-browser");
    assert.equal(await result.evaluate((node) => node.classList.contains("is-error")), false);
    assert.equal(await turnResult(2), "succeeded");
    await page.locator(".assistant-text", { hasText: "The command ran." }).waitFor();
    await screenshot("tool-approved");
  });

  await step("a tool request is denied", async () => {
    await send(script([{ tool: "Bash", input: { command: "echo never-runs > denied.txt" } }, { text: "ok" }]));
    const request = page.locator(".permission-request").nth(1);
    await request.locator("button.deny").click();
    await page.locator(".permission-request[data-decision=deny]").waitFor();
    const id = await page.locator(".tool-call[data-tool=Bash]").nth(1).getAttribute("data-tool-use-id");
    const result = page.locator(`.tool-result[data-tool-use-id="${id}"]`);
    await result.waitFor();
    assert.equal(await result.evaluate((node) => node.classList.contains("is-error")), true);
    assert.match(await result.textContent(), /denied in the web console/);
    assert.equal(await turnResult(3), "succeeded");
    await screenshot("tool-denied");
  });

  await step("interrupt", async () => {
    const slow = Array.from({ length: 60 }, (_, i) => `slow${i} `).join("");
    await send(script([{ text: slow, chunk: 6, delay: 0.25 }]));
    await page.locator(".assistant-text[data-streaming=true]").waitFor();
    await page.locator("#interrupt:enabled").click();
    assert.equal(await turnResult(4), "interrupted");
    assert.equal(await page.isDisabled("#interrupt"), true);
    await screenshot("interrupted");
  });

  await step("a network drop: reconnect, every event exactly once", async () => {
    const words = Array.from({ length: 40 }, (_, i) => `word${i} `).join("");
    await send(script([{ text: words, chunk: 5, delay: 0.1 }]));
    const answer = page.locator(".assistant-text[data-turn]").last();
    await page.locator(".assistant-text[data-streaming=true]").waitFor();
    // The network goes away: open connections die, new ones fail (DevTools offline emulation
    // alone only fails new requests, so the proxy cuts the live stream too).
    proxy.cut();
    await context.setOffline(true);
    await page.locator("#connection[data-state=reconnecting]").waitFor();
    const seenOffline = await answer.textContent();
    await screenshot("reconnecting");
    await page.waitForTimeout(1500); // the turn goes on without us
    await context.setOffline(false);
    proxy.restore();
    await page.locator("#connection[data-state=live]").waitFor();
    assert.equal(await turnResult(5), "succeeded");
    assert.equal(await answer.textContent(), words);
    assert.ok(seenOffline.length < words.length, "the drop happened mid-answer");

    // What the page rendered against the session's durable history.
    const { session, rendered } = await page.evaluate(() => window.corralConsole);
    const corral = createCorral({
      baseUrl: edgeUrl,
      getToken: () => page.evaluate(() => sessionStorage.getItem("corral.token")),
    });
    const history = await corral.session.listSessionEvents({ parent: session, pageSize: 1000 });
    const sequences = history.sessionEvents.map((e) => Number(e.sequence));
    assert.deepEqual(rendered, sequences, "each event rendered exactly once, in order");
    assert.equal(new Set(rendered).size, rendered.length);
    await screenshot("reconnected");
  });

  await step("usage", async () => {
    await page.locator('#session-usage dd[data-usage="turns"]', { hasText: "5" }).waitFor();
    const output = Number(await page.textContent('#session-usage dd[data-usage="output tokens"]'));
    assert.ok(output > 0, "the session's usage shows output tokens");
    await page.locator("#usage-totals dd").first().waitFor();
    await screenshot("usage");
  });

  await step("the access token is refreshed before it expires", async () => {
    const old = await page.evaluate(() => {
      sessionStorage.setItem("corral.expiry", String(Date.now())); // as if it expired now
      return sessionStorage.getItem("corral.token");
    });
    await page.click("#refresh-sessions");
    await page.waitForFunction((token) => sessionStorage.getItem("corral.token") !== token, old);
    await page.locator("#sessions li", { hasText: "browser test" }).waitFor();
    assert.equal(await page.isVisible("#app-view"), true, "still signed in");
  });

  await step("sessions survive a reload", async () => {
    await page.goto(consoleUrl); // straight to the edge named by config.json, same tab
    await page.locator("#sessions li", { hasText: "browser test" }).click();
    await page.locator(".turn-result").nth(4).waitFor();
    assert.equal(await page.locator(".tool-call").count(), 2);
    await screenshot("reloaded");
  });

  await step("a session that runs tools without asking (the default organisation allows it)", async () => {
    await page.fill("#new-session-name", "unattended");
    await page.selectOption("#new-session-permissions", "allow");
    await page.click("#new-session button[type=submit]");
    await page.locator("#sessions li.selected", { hasText: "unattended" }).waitFor();
    await send(script([{ tool: "Bash", input: { command: "echo ran-unasked" } }, { text: "done" }]));
    const result = page.locator(".tool-result").first();
    await result.waitFor();
    assert.equal(await result.textContent(), "↳ ran-unasked");
    assert.equal(await turnResult(1), "succeeded");
    assert.equal(await page.locator(".permission-request").count(), 0, "nothing was asked");
    await screenshot("unattended");
  });

  assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
} catch {
  run.fail();
} finally {
  await proxy.close();
}
await run.finish();
