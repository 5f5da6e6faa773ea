// What the console's browser tests share: their settings from the environment, Debian's
// headless Chromium (driven by playwright-core), numbered screenshots, and steps that print one
// line each and stop the script at the first failure (with a screenshot of it).
import { mkdir, readdir, rm } from "node:fs/promises";
import { join } from "node:path";

import { chromium } from "playwright-core";

export const TIMEOUT = 30_000;

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

/** A message that scripts the offline model (services/runtime/offline_model/script.py). */
export const script = (steps) => `<<corral-model ${JSON.stringify(steps)}>>`;

const started = Date.now();
export function log(message) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`);
}

/** Chromium with a page; screenshots go to `artifacts` (its old PNGs removed first). */
export async function open(artifacts) {
  await mkdir(artifacts, { recursive: true });
  for (const name of await readdir(artifacts)) {
    if (name.endsWith(".png")) await rm(join(artifacts, name));
  }
  // The flags this machine needs (closed network, running as root): see the machine notes.
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error") log(`browser console: ${message.text()}`);
  });

  let shot = 0;
  let failed = false;
  const run = {
    browser,
    context,
    page,
    pageErrors,
    get shots() {
      return shot;
    },
    get failed() {
      return failed;
    },
    async screenshot(name, target = page) {
      shot += 1;
      const file = join(artifacts, `${String(shot).padStart(2, "0")}-${name}.png`);
      await target.screenshot({ path: file, fullPage: true });
      return file;
    },
    async step(name, body) {
      const begin = Date.now();
      try {
        await body();
        log(`ok    ${name} (${Date.now() - begin} ms)`);
      } catch (error) {
        failed = true;
        log(`FAIL  ${name}: ${error?.stack ?? error}`);
        const toast = await page.locator("#toast:visible").textContent({ timeout: 1000 }).catch(() => "");
        if (toast) log(`      the page's last error: ${toast}`);
        await run.screenshot(`failed-${name.replace(/\W+/g, "-")}`).catch(() => undefined);
        throw error;
      }
    },
    fail() {
      failed = true;
    },
    /** Closes the browser, prints the verdict and exits (1 on any failure). */
    async finish() {
      await browser.close();
      log(failed ? "e2e failed" : `e2e passed, ${shot} screenshots in ${artifacts}`);
      process.exit(failed ? 1 : 0);
    },
  };
  return run;
}

/** Signs in on the console's page (at `url`) and waits for the session view. */
export async function signIn(page, url, email, password) {
  await page.goto(url);
  await page.locator("#login-form").waitFor();
  await page.fill("#login-email", email);
  await page.fill("#login-password", password);
  await page.click("#login-form button[type=submit]");
  await page.locator("#app-view").waitFor({ state: "visible" });
}
