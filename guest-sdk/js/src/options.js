// Task options as `task()` takes them, checked the way the Rust macro checks them. This runs
// when the module is evaluated, which `stem-guest-js build` does while it builds the component:
// a bad option fails the build with a message naming the task.

const DURATION_UNITS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 };
const SIZE_UNITS = { '': 1, B: 1, KiB: 1 << 10, MiB: 1 << 20, GiB: 1 << 30 };
const U32_MAX = 2 ** 32 - 1;
const TASK_NAME = /^[A-Za-z0-9_.:-]{1,200}$/;
const QUEUE_NAME = /^[A-Za-z0-9._-]{1,128}$/;
const SECRET_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;

export class OptionError extends Error {}

function numberAndUnit(text) {
  const match = /^\s*(\d+)\s*([A-Za-z]*)\s*$/.exec(text);
  return match ? [Number(match[1]), match[2]] : null;
}

/** Milliseconds from a number of seconds or a string such as "500ms", "30s", "5m", "1h". */
export function durationMs(task, option, value) {
  if (typeof value === 'number') {
    if (!Number.isFinite(value) || value < 0) {
      throw new OptionError(`task \`${task}\`: ${option} must be a non-negative number of seconds`);
    }
    return Math.round(value * 1000);
  }
  const parsed = typeof value === 'string' ? numberAndUnit(value) : null;
  if (!parsed || !(parsed[1] in DURATION_UNITS)) {
    throw new OptionError(
      `task \`${task}\`: ${option} \`${value}\` is not a duration; write seconds as a number ` +
        'or e.g. "500ms", "30s", "5m" or "1h"',
    );
  }
  return parsed[0] * DURATION_UNITS[parsed[1]];
}

function sizeBytes(task, option, value) {
  if (Number.isInteger(value) && value > 0) return value;
  const parsed = typeof value === 'string' ? numberAndUnit(value) : null;
  if (!parsed || !(parsed[1] in SIZE_UNITS)) {
    throw new OptionError(
      `task \`${task}\`: ${option} \`${value}\` is not a size; write bytes as an integer ` +
        'or e.g. "512KiB", "64MiB" or "1GiB"',
    );
  }
  return parsed[0] * SIZE_UNITS[parsed[1]];
}

function integer(task, option, value, maximum) {
  if (!Number.isInteger(value) || value < 0 || value > maximum) {
    throw new OptionError(`task \`${task}\`: ${option} must be an integer from 0 to ${maximum}`);
  }
  return value;
}

function text(task, option, value, pattern, hint = '') {
  if (typeof value !== 'string' || value.trim() === '') {
    throw new OptionError(`task \`${task}\`: ${option} must be a non-empty string`);
  }
  if (pattern && !pattern.test(value)) {
    throw new OptionError(`task \`${task}\`: ${option} \`${value}\` is not valid${hint}`);
  }
  return value;
}

function rateLimit(task, value) {
  const [count, per] = String(value).split('/');
  if (!(/^\s*\d+\s*$/.test(count) && Number(count) > 0 && ['s', 'm', 'h'].includes(per?.trim()))) {
    throw new OptionError(
      `task \`${task}\`: \`${value}\` is not a rate limit; write e.g. "10/s", "100/m" or "1000/h"`,
    );
  }
  return value;
}

function isOutbound(pattern) {
  const at = pattern.indexOf('://');
  if (at < 0) return false;
  const scheme = pattern.slice(0, at);
  const rest = pattern.slice(at + 3);
  return (
    ['http', 'https', '*'].includes(scheme) &&
    rest !== '' &&
    !/[/?#@ ]/.test(rest.replace(/\/+$/, ''))
  );
}

function isDirectory(entry) {
  const at = entry.lastIndexOf(':');
  if (at < 0) return false;
  const path = entry.slice(0, at);
  const mode = entry.slice(at + 1);
  return (
    path.startsWith('/') &&
    ['ro', 'rw'].includes(mode) &&
    !path.includes(':') &&
    (path === '/' || path.slice(1).split('/').every((part) => !['', '.', '..'].includes(part)))
  );
}

const CAPABILITIES = {
  outbound: [
    isOutbound,
    'is not an outbound pattern; write `scheme://host[:port]`, e.g. "https://api.example.com"',
  ],
  secrets: [(name) => SECRET_NAME.test(name), 'is not a secret name: use letters, digits and `_`'],
  dirs: [isDirectory, 'is not a directory; write an absolute path and a mode, e.g. "/data/in:ro"'],
};

const KNOWN = [
  'name', 'description', 'params', 'queue', 'priority', 'maxRetries', 'retryBackoff',
  'retryBackoffMax', 'retryJitter', 'softTimeLimit', 'timeLimit', 'rateLimit', 'memoryLimit',
  'argsEncoder', 'resultEncoder', 'outbound', 'secrets', 'dirs',
];

const maybe = (value, convert) => (value === undefined || value === null ? undefined : convert(value));

/** The task's definition as `describe` reports it (WIT field names in camelCase). */
export function definition(options) {
  const name = text('?', 'name', options.name, TASK_NAME, ': use up to 200 letters, digits, `.`, `_`, `-` and `:`');
  const unknown = Object.keys(options).filter((key) => !KNOWN.includes(key));
  if (unknown.length) {
    throw new OptionError(`task \`${name}\`: unknown option(s) ${unknown.join(', ')}; known: ${KNOWN.join(', ')}`);
  }
  const soft = maybe(options.softTimeLimit, (v) => durationMs(name, 'softTimeLimit', v));
  const hard = maybe(options.timeLimit, (v) => durationMs(name, 'timeLimit', v));
  if (soft !== undefined && hard !== undefined && soft > hard) {
    throw new OptionError(`task \`${name}\`: softTimeLimit (${soft}ms) is above timeLimit (${hard}ms)`);
  }
  if (options.retryJitter !== undefined && typeof options.retryJitter !== 'boolean') {
    throw new OptionError(`task \`${name}\`: retryJitter must be true or false`);
  }
  const big = (value) => (value === undefined ? undefined : BigInt(value));
  const capabilities = {};
  for (const [kind, [valid, hint]] of Object.entries(CAPABILITIES)) {
    const values = options[kind] ?? [];
    if (!Array.isArray(values)) throw new OptionError(`task \`${name}\`: ${kind} must be a list of strings`);
    for (const value of values) {
      if (typeof value !== 'string' || !valid(value)) throw new OptionError(`task \`${name}\`: ${kind}: \`${value}\` ${hint}`);
    }
    capabilities[kind] = [...values];
  }
  return {
    name,
    description: options.description,
    options: {
      queue: maybe(options.queue, (v) => text(name, 'queue', v, QUEUE_NAME, ': use 1 to 128 letters, digits, `.`, `_` and `-`')),
      priority: maybe(options.priority, (v) => integer(name, 'priority', v, 9)),
      maxRetries: maybe(options.maxRetries, (v) => integer(name, 'maxRetries', v, U32_MAX)),
      retryBackoffMs: big(maybe(options.retryBackoff, (v) => durationMs(name, 'retryBackoff', v))),
      retryBackoffMaxMs: big(maybe(options.retryBackoffMax, (v) => durationMs(name, 'retryBackoffMax', v))),
      retryJitter: options.retryJitter,
      softTimeLimitMs: big(soft),
      hardTimeLimitMs: big(hard),
      rateLimit: maybe(options.rateLimit, (v) => rateLimit(name, v)),
      memoryLimitBytes: big(maybe(options.memoryLimit, (v) => sizeBytes(name, 'memoryLimit', v))),
      argsEncoder: maybe(options.argsEncoder, (v) => text(name, 'argsEncoder', v)),
      resultEncoder: maybe(options.resultEncoder, (v) => text(name, 'resultEncoder', v)),
    },
    capabilities,
  };
}
