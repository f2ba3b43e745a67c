// The SDK's engine-independent half, under Node: options, argument checks and outcomes. (The
// component half runs through a real worker in host/tests/all/languages.rs.)

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { definitions, OptionError, Reject, Retry, runTask, StemError, task } from '../src/index.js';

const host = (enqueued = []) => ({
  log() {},
  enqueue(name, args, options) {
    if (name === 'refused') throw { payload: 'the sub-task budget is used up' };
    enqueued.push([name, JSON.parse(args), options]);
    return 'child-1';
  },
});
const run = (name, args, h = host()) =>
  runTask(h, { id: 't-1', name, args: JSON.stringify(args), attempt: 1, headers: [] });

task({ name: 't.add', params: { a: 'integer', b: 'integer?' } }, ({ a, b = 1 }) => a + b);
task({ name: 't.outcomes', maxRetries: 2, retryBackoff: '250ms', timeLimit: 30, params: { kind: 'string' } }, ({ kind }) => {
  if (kind === 'reject') throw new Reject('never');
  if (kind === 'retry') throw new Retry('later', { after: '2s' });
  if (kind === 'async') return Promise.resolve(1);
  throw new RangeError(kind);
});
task({ name: 't.spawn', params: { name: 'string' } }, ({ name }, ctx) =>
  ctx.enqueue(name, { a: 1 }, { queue: 'q', countdown: '5s' }),
);

test('arguments that fit run; others reject', () => {
  assert.deepEqual(run('t.add', { a: 2, b: 40 }), { ok: '42' });
  assert.deepEqual(run('t.add', { a: 2 }), { ok: '3' });
  for (const [args, expected] of [
    [{ a: '2' }, '`a` is string, expected integer'],
    [{ a: 1.5 }, '`a` is number, expected integer'],
    [{}, 'missing argument `a`'],
    [{ a: 1, c: 2 }, 'unknown argument(s) c'],
    [[1, 2], 'the arguments are array, expected an object'],
  ]) {
    const outcome = run('t.add', args);
    assert.ok(outcome.reject?.includes(expected), `${JSON.stringify(args)}: ${JSON.stringify(outcome)}`);
  }
  assert.ok(run('t.nope', {}).reject.includes('no task `t.nope`'));
});

test('reject, retry, failures and promises', () => {
  assert.deepEqual(run('t.outcomes', { kind: 'reject' }), { reject: 'never' });
  assert.deepEqual(run('t.outcomes', { kind: 'retry' }), { retry: { afterMs: 2000, message: 'later' } });
  const failed = run('t.outcomes', { kind: 'boom' }).fail;
  assert.ok(failed.startsWith('RangeError: boom\n'), failed);
  assert.ok(run('t.outcomes', { kind: 'async' }).fail.includes('must be synchronous'));
});

test('sub-tasks go through the host, refusals become StemError failures', () => {
  const enqueued = [];
  assert.deepEqual(run('t.spawn', { name: 't.add' }, host(enqueued)), { ok: '"child-1"' });
  assert.deepEqual(enqueued, [['t.add', { a: 1 }, { queue: 'q', priority: undefined, countdownMs: 5000n }]]);
  const failed = run('t.spawn', { name: 'refused' }).fail;
  assert.ok(failed.startsWith('StemError: cannot enqueue sub-task `refused`: the sub-task budget is used up'), failed);
  assert.ok(new StemError('x') instanceof Error);
});

test('options become the WIT definition; bad ones throw naming the task', () => {
  const definition = definitions().find((d) => d.name === 't.outcomes');
  assert.equal(definition.options.maxRetries, 2);
  assert.equal(definition.options.retryBackoffMs, 250n);
  assert.equal(definition.options.hardTimeLimitMs, 30000n);
  assert.deepEqual(definition.capabilities, { outbound: [], secrets: [], dirs: [] });
  for (const [options, expected] of [
    [{ name: 'bad.priority', priority: 10 }, 'priority must be an integer from 0 to 9'],
    [{ name: 'bad.duration', timeLimit: '5 minutes' }, 'is not a duration'],
    [{ name: 'bad.limits', softTimeLimit: '1m', timeLimit: '30s' }, 'above timeLimit'],
    [{ name: 'bad.rate', rateLimit: '10 per second' }, 'is not a rate limit'],
    [{ name: 'bad.dir', dirs: ['data:ro'] }, 'is not a directory'],
    [{ name: 'bad.option', retries: 3 }, 'unknown option(s) retries'],
    [{ name: 'bad name' }, 'is not valid'],
  ]) {
    assert.throws(() => task(options, () => null), (error) => error instanceof OptionError && error.message.includes(expected), JSON.stringify(options));
  }
  assert.throws(() => task({ name: 't.add' }, () => null), /declared twice/);
  assert.throws(() => task({ name: 't.params', params: { a: 'int' } }, () => null), /is not one of/);
});
