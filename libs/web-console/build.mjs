// Bundles src/app.ts (and the SDK it imports from ../ts-sdk/src) into dist/, with the page and
// its stylesheet. `node build.mjs --watch` rebuilds on change.
import { build, context } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

const dist = new URL("./dist/", import.meta.url);
await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
for (const file of ["index.html", "style.css"]) {
  await copyFile(new URL(`./src/${file}`, import.meta.url), new URL(file, dist));
}
const options = {
  entryPoints: [new URL("./src/app.ts", import.meta.url).pathname],
  outfile: new URL("app.js", dist).pathname,
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: true,
  legalComments: "none",
  logLevel: "warning",
};
if (process.argv.includes("--watch")) {
  await (await context(options)).watch();
} else {
  await build(options);
}
