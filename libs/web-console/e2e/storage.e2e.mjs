// The console's files panel and reports page end to end in headless Chromium, against a running
// Corral: tests/web/test_console_storage.py brings the stack up and runs this with
//   CONSOLE_URL EDGE_URL CORRAL_EMAIL CORRAL_PASSWORD ARTIFACTS CHROMIUM
// Reports of each kind are filed through the API first; the browser lists and filters them,
// renders Markdown (sanitised), pretty-prints JSON and keeps HTML in a sandboxed frame where its
// scripts never run. Then it uploads a small and a big file into a session's workspace, has the
// agent (the offline model, scripted) read them and write files of its own, browses into the
// directory the agent made and downloads what it wrote, byte for byte. Last, a viewer of the
// organisation reads those files but is refused an upload, and another user sees nothing.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";

import { createCorral } from "../../ts-sdk/dist/index.js";
import { Role } from "../../ts-sdk/dist/gen/corral/identity/v1/role_pb.js";
import { ReportFormat } from "../../ts-sdk/dist/gen/corral/storage/v1/report_pb.js";
import { env, open, script, signIn } from "./harness.mjs";

const consoleUrl = env("CONSOLE_URL");
const edgeUrl = env("EDGE_URL");
const email = env("CORRAL_EMAIL");
const password = env("CORRAL_PASSWORD");
const artifacts = env("ARTIFACTS");

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");
const RUN = `e2e${Date.now().toString(36)}`;

// ---- the reports, filed through the API as a task run or a user would ----

const login = await createCorral({ baseUrl: edgeUrl }).identity.login({ email, password });
const api = createCorral({ baseUrl: edgeUrl, token: login.token.accessToken });
const encode = (text) => new TextEncoder().encode(text);

const MARKDOWN = [
  "# Weekly findings",
  "",
  "Results of **the run**, with `inline code` and a [link](https://example.invalid/doc).",
  "",
  "- first item",
  "- second item",
  "",
  "```",
  "echo fenced",
  "```",
  "",
  '<script>window.pwned = "markdown script"</script>',
  '<img src="https://tracker.invalid/pixel.png" alt="pixel" onerror="window.pwned = \'markdown onerror\'">',
  '<a href="javascript:window.pwned = \'markdown link\'">click me</a>',
].join("\n");
const JSON_VALUE = { run: RUN, passed: 12, failed: 0, ratio: 0.5, tags: ["a", "b"], nested: { ok: true, none: null } };
const ATTACK = [
  "<!doctype html><html><head><title>inner</title></head><body>",
  "<h1 id=\"heading\">HTML report</h1>",
  '<p id="marker">static</p>',
  "<script>",
  '  document.getElementById("marker").textContent = "script ran";',
  '  try { window.top.pwned = "html top"; } catch (e) {}',
  '  try { parent.document.title = "pwned"; } catch (e) {}',
  '  try { parent.sessionStorage.setItem("stolen", "yes"); } catch (e) {}',
  "</script>",
  '<img src="data:," onerror="window.top.pwned = \'html onerror\'">',
  '<form action="https://example.invalid/"><input name="q"></form>',
  "</body></html>",
].join("\n");

const reports = {};
for (const [kind, report] of Object.entries({
  markdown: { title: `${RUN} findings`, format: ReportFormat.MARKDOWN, content: encode(MARKDOWN) },
  json: { title: `${RUN} metrics`, format: ReportFormat.JSON, content: encode(JSON.stringify(JSON_VALUE)) },
  html: { title: `${RUN} page`, format: ReportFormat.HTML, content: encode(ATTACK) },
  other: { title: `${RUN} log`, contentType: "text/plain", content: encode("plain <b>text</b> log\n") },
})) {
  const reply = await api.storage.createReport({
    report: { ...report, labels: { e2e: RUN } },
    requestId: crypto.randomUUID(),
  });
  reports[kind] = reply.report.name;
}

// ---- the browser ----

const run = await open(artifacts);
const { page, pageErrors, screenshot, step } = run;

/** What a script in a report could have done to the console's page. */
async function untouched() {
  const state = await page.evaluate(() => ({
    pwned: window.pwned,
    title: document.title,
    stolen: sessionStorage.getItem("stolen"),
  }));
  assert.deepEqual(state, { pwned: undefined, title: "Corral console", stolen: null });
}

/** Waits until the page lists exactly these reports (a listing answers some time after a click). */
async function listed(names) {
  const same = (expected) => JSON.stringify(window.corralConsole.reports.listed) === JSON.stringify(expected);
  try {
    await page.waitForFunction(same, names, { timeout: 10_000 });
  } catch (error) {
    const seen = await page.evaluate(() => window.corralConsole.reports);
    assert.fail(`listed ${JSON.stringify(seen)}, expected ${JSON.stringify(names)}: ${error}`);
  }
}

async function openReport(kind) {
  await page.locator(`#reports li[data-name="${reports[kind]}"]`).click();
  await page.waitForFunction((name) => window.corralConsole.reports.shown === name, reports[kind]);
  await page.locator(`#report-body[data-format]`).waitFor();
}

/** Clicks a download button; returns the bytes the browser saved and the name it chose. */
async function download(button) {
  const [saved] = await Promise.all([page.waitForEvent("download"), button.click()]);
  const path = await saved.path();
  return { name: saved.suggestedFilename(), bytes: await readFile(path) };
}

try {
  await step("the reports page lists and filters reports", async () => {
    await signIn(page, consoleUrl, email, password);
    await page.click('#nav a[data-view="reports"]');
    await page.locator("#reports-view").waitFor({ state: "visible" });
    await page.fill("#report-filter-label", `e2e=${RUN}`);
    await page.click('#report-filters button[type="submit"]');
    await page.waitForFunction(() => window.corralConsole.reports.filter.startsWith("labels.e2e"));
    await page.locator("#reports li[data-name]").nth(3).waitFor();
    assert.equal(await page.locator("#reports li[data-name]").count(), 4);
    // Newest first: the order they were filed in, reversed.
    const names = await page.locator("#reports li[data-name]").evaluateAll((items) => items.map((i) => i.dataset.name));
    assert.deepEqual(names, [reports.other, reports.html, reports.json, reports.markdown]);
    await screenshot("reports-listed");

    await page.selectOption("#report-filter-format", "JSON");
    await page.click('#report-filters button[type="submit"]');
    await listed([reports.json]);
    assert.equal(await page.textContent("#reports li[data-name] .title"), `${RUN} metrics`);

    await page.selectOption("#report-filter-format", "");
    await page.fill("#report-filter-title", `${RUN} fin`);
    await page.click('#report-filters button[type="submit"]');
    await listed([reports.markdown]);
    await screenshot("reports-filtered");
    await page.fill("#report-filter-title", "");
    await page.click('#report-filters button[type="submit"]');
    await listed([reports.other, reports.html, reports.json, reports.markdown]);
  });

  await step("a Markdown report is rendered and sanitised", async () => {
    // The browser logs one CSP report here: DOMPurify parses the report in an inert document,
    // which inherits the page's policy, and Chrome reports the onerror attribute it meets
    // there (it would never run: the sanitiser drops it; the policy is the wall behind that).
    await openReport("markdown");
    const body = page.locator("#report-body .markdown");
    assert.equal(await body.locator("h1").textContent(), "Weekly findings");
    assert.equal(await body.locator("strong").textContent(), "the run");
    assert.deepEqual(await body.locator("li").allTextContents(), ["first item", "second item"]);
    assert.equal((await body.locator("pre code").textContent()).trim(), "echo fenced");
    const link = body.locator('a:has-text("link")');
    assert.equal(await link.getAttribute("target"), "_blank");
    assert.match(await link.getAttribute("rel"), /noopener/);
    // Nothing active survives: no script, no handler, no javascript: URL, no remote image.
    const active = await body.evaluate((node) => ({
      scripts: node.querySelectorAll("script").length,
      handlers: [...node.querySelectorAll("*")].filter((e) => [...e.attributes].some((a) => a.name.startsWith("on"))).length,
      javascript: [...node.querySelectorAll("a")].filter((a) => (a.getAttribute("href") ?? "").startsWith("javascript:")).length,
      imageSources: [...node.querySelectorAll("img")].map((img) => img.getAttribute("src")),
    }));
    assert.deepEqual(active, { scripts: 0, handlers: 0, javascript: 0, imageSources: [null] });
    await page.locator("#report-body .markdown a", { hasText: "click me" }).click();
    await untouched();
    assert.equal(await page.textContent("#report-title"), `${RUN} findings`);
    await screenshot("report-markdown");
    const saved = await download(page.locator("#report-download"));
    assert.equal(saved.name, `${RUN}-findings.md`);
    assert.equal(saved.bytes.toString(), MARKDOWN);
  });

  await step("a JSON report is pretty-printed", async () => {
    await openReport("json");
    assert.equal(await page.textContent("#report-body pre.json"), JSON.stringify(JSON_VALUE, null, 2));
    assert.equal(await page.locator("#report-body .json-key").first().textContent(), '"run"');
    await screenshot("report-json");
  });

  await step("an HTML report stays in a sandboxed frame, its scripts never run", async () => {
    // The payload is live: in a page of its own (no sandbox, no policy) its script runs.
    const control = await run.context.newPage();
    await control.setContent(ATTACK);
    assert.equal(await control.textContent("#marker"), "script ran");
    assert.match(String(await control.evaluate(() => window.pwned)), /^html /);
    await control.close();

    await openReport("html");
    const frame = page.locator("#report-frame");
    await frame.waitFor();
    const attributes = await frame.evaluate((node) => ({
      sandbox: node.getAttribute("sandbox"),
      permissions: node.sandbox.length,
      src: node.getAttribute("src"),
      srcdoc: node.srcdoc.includes("HTML report"),
    }));
    assert.deepEqual(attributes, { sandbox: "", permissions: 0, src: null, srcdoc: true });
    const inner = page.frameLocator("#report-frame");
    assert.equal(await inner.locator("#heading").textContent(), "HTML report");
    const content = page.frames().find((f) => f.url() === "about:srcdoc");
    assert.ok(content, "the report is the frame's srcdoc, not a page of the API's origin");
    await content.waitForLoadState("load"); // the image has failed, its handler had its chance
    assert.equal(await inner.locator("#marker").textContent(), "static", "the report's script did not run");
    await untouched();
    await screenshot("report-html");
  });

  await step("a plain-text report is shown as text", async () => {
    await openReport("other");
    assert.equal(await page.textContent("#report-body pre"), "plain <b>text</b> log\n");
    assert.equal(await page.locator("#report-body b").count(), 0);
  });

  // ---- files ----

  const notes = `Notes for the agent, ${RUN}.\nSecond line, ünïcödé.\n`;
  const big = randomBytes(6 * 1024 * 1024 + 4321); // over WriteFile's limit: a chunked upload
  let workspace = "";

  await step("a new session shows its workspace in the files panel", async () => {
    await page.click('#nav a[data-view="sessions"]');
    await page.fill("#new-session-name", "files test");
    // "ask": the organisation's default policy allows no bypass (it asks before tools).
    await page.selectOption("#new-session-permissions", "ask");
    await page.click("#new-session button[type=submit]");
    await page.locator("#sessions li.selected", { hasText: "files test" }).waitFor({ timeout: 5000 });
    await page.waitForFunction(() => window.corralConsole.files.workspace !== "");
    workspace = await page.evaluate(() => window.corralConsole.files.workspace);
    const session = await page.evaluate(() => window.corralConsole.session);
    assert.equal(workspace, session.replace(/^sessions\//, "workspaces/"));
    await page.locator("#files-status", { hasText: "No files yet." }).waitFor();
    assert.equal(await page.isEnabled("#files-input"), true);
  });

  await step("upload a small file and a big one, with progress", async () => {
    await page.evaluate(() => {
      window.progress = [];
      new MutationObserver((records) => {
        for (const record of records) {
          const row = record.target.closest?.("li");
          if (record.target.tagName === "PROGRESS" && row?.dataset.path === "big.bin") {
            window.progress.push(Number(record.target.getAttribute("value")));
          }
        }
      }).observe(document.getElementById("files-transfers"), { attributes: true, subtree: true });
    });
    await page.setInputFiles("#files-input", [
      { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from(notes) },
      { name: "big.bin", mimeType: "application/octet-stream", buffer: big },
    ]);
    await page.locator('#files-transfers li[data-path="big.bin"][data-state="done"]').waitFor();
    await page.locator('#files-transfers li[data-path="notes.txt"][data-state="done"]').waitFor();
    const progress = await page.evaluate(() => window.progress);
    assert.ok(progress.some((v) => v > 0 && v < big.length), `progress in between: ${progress}`);
    await page.locator('#files-list tr.file[data-path="big.bin"]').waitFor();
    assert.equal(await page.textContent('#files-list tr[data-path="big.bin"] .size'), "6.0 MiB");
    assert.equal(
      await page.getAttribute('#files-list tr[data-path="notes.txt"] .size', "data-bytes"),
      String(Buffer.byteLength(notes)),
    );
    assert.match(await page.textContent('#files-list tr[data-path="notes.txt"] .modified'), /\d/);
    await screenshot("files-uploaded");
    // What storage holds is what was sent.
    const stored = await api.storage.listFiles({ parent: workspace });
    const byPath = Object.fromEntries(stored.files.map((f) => [f.path, f]));
    assert.equal(Number(byPath["big.bin"].sizeBytes), big.length);
    assert.equal((await api.storage.getFile({ name: byPath["big.bin"].name })).file.sha256, sha256(big));
  });

  await step("the agent reads the uploaded files and writes its own", async () => {
    const command =
      "cat notes.txt && mkdir -p out && tr a-z A-Z < notes.txt > out/shout.txt" +
      " && sha256sum big.bin | cut -c1-64 > out/big.sha256";
    await page.fill("#message", script([{ tool: "Bash", input: { command } }, { text: "Read and written." }]));
    await page.click("#send");
    const request = page.locator(".permission-request").first();
    await request.waitFor();
    await request.locator("button.allow").click();
    const call = page.locator(".tool-call[data-tool=Bash]").first();
    await call.waitFor();
    const id = await call.getAttribute("data-tool-use-id");
    const result = page.locator(`.tool-result[data-tool-use-id="${id}"]`);
    await result.waitFor();
    assert.equal(await result.textContent(), `↳ ${notes.trimEnd()}`);
    assert.equal(await page.locator(".turn-result").first().getAttribute("data-status"), "succeeded");
    // The panel refreshes when the turn ends: the agent's directory shows up.
    await page.locator('#files-list tr.directory[data-prefix="out/"]').waitFor();
    await screenshot("agent-wrote");
  });

  await step("browse into the agent's directory and download what it wrote", async () => {
    await page.locator('#files-list tr.directory[data-prefix="out/"] button').click();
    await page.locator('#files-list tr.file[data-path="out/shout.txt"]').waitFor();
    assert.deepEqual(await page.evaluate(() => window.corralConsole.files.listed), ["out/big.sha256", "out/shout.txt"]);
    assert.equal(await page.textContent("#files-path"), "workspace / out");
    await screenshot("files-out");
    const shout = await download(page.locator('#files-list tr[data-path="out/shout.txt"] button'));
    assert.equal(shout.name, "shout.txt");
    assert.equal(shout.bytes.toString(), notes.replace(/[a-z]/g, (c) => c.toUpperCase()));
    const digest = await download(page.locator('#files-list tr[data-path="out/big.sha256"] button'));
    assert.equal(digest.bytes.toString(), `${sha256(big)}\n`, "the agent read the big upload byte for byte");

    await page.locator('#files-path button[data-prefix=""]').click();
    await page.locator('#files-list tr.file[data-path="big.bin"]').waitFor();
    const back = await download(page.locator('#files-list tr[data-path="big.bin"] button'));
    assert.equal(back.bytes.length, big.length);
    assert.equal(sha256(back.bytes), sha256(big));
    await page.locator('#files-transfers li[data-kind="download"][data-path="big.bin"][data-state="done"]').waitFor();
    await screenshot("files-downloaded");
  });

  await step("a viewer sees the files and reports but cannot upload; another user sees neither", async () => {
    const organization = login.user.name.split("/").slice(0, 2).join("/");
    const people = {};
    for (const role of ["viewer", "user"]) {
      const person = { email: `${role}-${RUN}@corral.local`, password: `${role} password ${RUN}` };
      await api.identity.createUser({
        parent: organization,
        user: { ...person, displayName: role, role: role === "viewer" ? Role.VIEWER : Role.USER },
        requestId: crypto.randomUUID(),
      });
      people[role] = person;
    }
    const other = await run.browser.newContext({ viewport: { width: 1280, height: 860 } });
    try {
      const viewer = await other.newPage();
      await signIn(viewer, consoleUrl, people.viewer.email, people.viewer.password);
      await viewer.locator("#sessions li", { hasText: "files test" }).click();
      await viewer.locator('#files-list tr.file[data-path="notes.txt"]').waitFor();
      await viewer.setInputFiles("#files-input", [{ name: "intruder.txt", mimeType: "text/plain", buffer: Buffer.from("no") }]);
      const refused = viewer.locator('#files-transfers li[data-path="intruder.txt"][data-state="failed"]');
      await refused.waitFor();
      assert.match(await refused.locator(".status").textContent(), /^PermissionDenied/);
      await screenshot("viewer-refused", viewer);
      const [saved] = await Promise.all([
        viewer.waitForEvent("download"),
        viewer.locator('#files-list tr[data-path="notes.txt"] button').click(),
      ]);
      assert.equal((await readFile(await saved.path())).toString(), notes, "a viewer may read");
      await viewer.close();

      const stranger = await other.newPage();
      await signIn(stranger, consoleUrl, people.user.email, people.user.password);
      await stranger.locator("#sessions li.muted", { hasText: "No sessions yet." }).waitFor();
      await stranger.click('#nav a[data-view="reports"]');
      await stranger.fill("#report-filter-label", `e2e=${RUN}`);
      await stranger.click('#report-filters button[type="submit"]');
      await stranger.waitForFunction(() => window.corralConsole.reports.filter.startsWith("labels.e2e"));
      await stranger.locator("#reports li.muted", { hasText: "No reports." }).waitFor();
      // Straight to a report by its name: as if it did not exist.
      await stranger.goto(`${consoleUrl}/#${reports.html}`);
      await stranger.locator("#toast", { hasText: "NotFound" }).waitFor();
      assert.equal(await stranger.locator("#report-frame").count(), 0);
      await screenshot("stranger-sees-nothing", stranger);
    } finally {
      await other.close();
    }
  });

  assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
} catch {
  run.fail();
}
await run.finish();
