#!/usr/bin/env node
// `stem-guest-js build`: a JavaScript module of task() declarations in, a Stem component out.
//
// esbuild bundles the module with this SDK into one ES module (`stem:task/*` imports left to
// the component), then ComponentizeJS evaluates it once inside StarlingMonkey and snapshots
// the initialised engine into a component for the `stem:task` WIT shipped in this package.

import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');

const USAGE = `usage: stem-guest-js build MODULE.js [-o OUTPUT.wasm] [-q]

Bundles MODULE.js (and what it imports) with the Stem SDK and builds a WebAssembly component
for \`stem-host task upload\`. The module is evaluated once, at build time: its top-level code
runs then, not per task run.

  -o, --output FILE   the component to write (default: MODULE.wasm beside the module)
  -q, --quiet         print only errors`;

function parse(argv) {
  const [command, ...rest] = argv;
  if (command === '-h' || command === '--help' || command === 'help') return { help: true };
  if (command !== 'build') throw new Error(`unknown command \`${command ?? ''}\`\n\n${USAGE}`);
  const options = { quiet: false };
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i];
    if (arg === '-o' || arg === '--output') options.output = rest[++i];
    else if (arg === '-q' || arg === '--quiet') options.quiet = true;
    else if (arg === '-h' || arg === '--help') return { help: true };
    else if (arg.startsWith('-')) throw new Error(`unknown option \`${arg}\`\n\n${USAGE}`);
    else if (options.module) throw new Error(`one module at a time\n\n${USAGE}`);
    else options.module = arg;
  }
  if (!options.module) throw new Error(USAGE);
  return options;
}

// The task module's `stem-guest` and `stem-guest/canvas` are this SDK, whatever copy its own
// node_modules has: one table of tasks.
const SDK_MODULES = { 'stem-guest': 'src/index.js', 'stem-guest/canvas': 'src/canvas.js' };
const thisSdk = {
  name: 'stem-guest',
  setup(build) {
    build.onResolve({ filter: /^stem-guest(\/canvas)?$/ }, ({ path }) => ({
      path: join(root, SDK_MODULES[path]),
    }));
  },
};

export async function build({ module, output, quiet }) {
  const source = resolve(module);
  await stat(source).catch(() => {
    throw new Error(`${module}: no such file`);
  });
  output = resolve(output ?? join(dirname(source), `${basename(source, extname(source))}.wasm`));
  const started = Date.now();
  const work = await mkdtemp(join(tmpdir(), 'stem-guest-js-'));
  try {
    const entry = join(work, 'entry.js');
    await writeFile(
      entry,
      `import ${JSON.stringify(source)};\n` +
        `import { definitions } from ${JSON.stringify(join(root, 'src/index.js'))};\n` +
        `if (definitions().length === 0) throw new Error(${JSON.stringify(`${module} declares no task()`)});\n` +
        `export { handler } from ${JSON.stringify(join(root, 'src/handler.js'))};\n`,
    );
    const bundle = join(work, 'bundle.js');
    const esbuild = await import('esbuild');
    await esbuild.build({
      entryPoints: [entry],
      outfile: bundle,
      bundle: true,
      format: 'esm',
      platform: 'neutral',
      target: 'es2022',
      mainFields: ['module', 'main'],
      external: ['stem:task/*'],
      plugins: [thisSdk],
      logLevel: 'error',
    });
    if (!quiet) console.error(`building ${basename(output)} from ${module} with ComponentizeJS ...`);
    const { componentize } = await import('@bytecodealliance/componentize-js');
    const { component } = await componentize({
      sourcePath: bundle,
      witPath: join(root, 'wit'),
      worldName: 'task',
      disableFeatures: ['http', 'fetch-event'],
    });
    await writeFile(output, component);
    if (!quiet) {
      const size = (component.length / (1 << 20)).toFixed(1);
      console.error(`built ${output} (${size} MiB) in ${((Date.now() - started) / 1000).toFixed(1)}s`);
    }
    return output;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

try {
  const options = parse(process.argv.slice(2));
  if (options.help) {
    console.log(USAGE);
  } else {
    const output = await build(options);
    if (!options.quiet) console.log(output);
  }
} catch (error) {
  console.error(`stem-guest-js: ${error.message ?? error}`);
  process.exitCode = 1;
}
