// Builds yjs.bundle.js (one ES module, minified) from the pinned npm packages, and collects
// their license notices into THIRD_PARTY_LICENSES.txt, which the bundle's banner points to.
// The page must work offline and from the installed wheel, so the bundle is committed.
import { build } from "esbuild";
import { readFileSync, writeFileSync, readdirSync } from "node:fs";

const bundled = ["yjs", "y-websocket", "y-protocols", "lib0"];
const versions = bundled.map((name) => {
  const pkg = JSON.parse(readFileSync(`node_modules/${name}/package.json`, "utf8"));
  return `${name}@${pkg.version} (${pkg.license})`;
});

let notices = "Third-party software bundled in yjs.bundle.js, with its license notices.\n";
for (const name of bundled) {
  const dir = `node_modules/${name}`;
  const file = readdirSync(dir).find((f) => /^licen[cs]e/i.test(f));
  const pkg = JSON.parse(readFileSync(`${dir}/package.json`, "utf8"));
  notices += `\n==== ${name}@${pkg.version} ====\n\n`;
  notices += file ? readFileSync(`${dir}/${file}`, "utf8") : `${pkg.license} (no license file shipped)\n`;
}
writeFileSync("THIRD_PARTY_LICENSES.txt", notices);

await build({
  entryPoints: ["yjs-entry.mjs"],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  platform: "browser",
  legalComments: "eof",
  outfile: "yjs.bundle.js",
  banner: { js: `/*! ${versions.join(", ")}: MIT licensed; notices in THIRD_PARTY_LICENSES.txt */` },
});
console.log(`yjs.bundle.js built from ${versions.join(", ")}`);
