// The cross-language scenario in JavaScript: the same tasks as tests/guests/scenario (Rust)
// and tests/guests/scenario-py, under the prefix `js.`.

import { Reject, task } from 'stem-guest';
import { chain, task as step } from 'stem-guest/canvas';

task({ name: 'js.add', params: { a: 'integer', b: 'integer' } }, ({ a, b }) => a + b);

task({ name: 'js.fail', maxRetries: 2, retryBackoff: '100ms', params: { message: 'string' } },
  ({ message }) => {
    throw new TypeError(message);
  });

task({ name: 'js.reject', params: { reason: 'string' } }, ({ reason }) => {
  throw new Reject(reason);
});

task({ name: 'js.spin', timeLimit: '2s' }, () => {
  for (;;) {
    // until the hard time limit stops it
  }
});

task({ name: 'js.hog', memoryLimit: '96MiB' }, () => {
  const blocks = [];
  for (;;) blocks.push(new Uint8Array(1 << 20).fill(1));
});

task({ name: 'js.spawn', params: { n: 'integer' } }, ({ n }, ctx) => ctx.enqueue('js.add', { a: n, b: n }));

// A canvas through the SDK's `stem-guest/canvas` import: js.add(n, n), then js.add(input, 1).
task({ name: 'js.chain', params: { n: 'integer' } }, ({ n }, ctx) =>
  ctx.submit(chain([step('js.add', { a: n, b: n }), step('js.inc', {})])),
);
task({ name: 'js.inc', params: { input: 'integer' } }, ({ input }) => input + 1);
