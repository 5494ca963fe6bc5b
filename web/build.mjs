// Copies the dashboard's run-time dependencies out of node_modules into the Python package
// (src/multiverse/master/ui/static/vendor), so that the master serves them itself: no CDN,
// and `pip install` of a built tree needs no Node.js. The ES modules are renamed .js, a type
// every server's MIME table knows. axe-core stays here: only the tests use it.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "..", "src", "multiverse", "master", "ui", "static", "vendor");
const files = {
  "@xterm/xterm/lib/xterm.mjs": "xterm.js",
  "@xterm/xterm/css/xterm.css": "xterm.css",
  "@xterm/addon-fit/lib/addon-fit.mjs": "addon-fit.js",
};
rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor, { recursive: true });
for (const [from, to] of Object.entries(files)) {
  // Their source maps are not shipped, so the references to them go too.
  const text = readFileSync(join(here, "node_modules", from), "utf8");
  writeFileSync(join(vendor, to), text.replace(/\n\/[/*][#@] sourceMappingURL=\S+( \*\/)?\s*$/, "\n"));
}
console.log(`dashboard assets in ${vendor}`);
