// Write Stem tasks in JavaScript and build them into WebAssembly components.
//
//   import { task, Retry, Reject } from 'stem-guest';
//
//   task({ name: 'text.slugify', params: { title: 'string', max: 'integer?' } },
//     ({ title, max = 60 }, ctx) => { ctx.info('slugifying'); return slug(title, max); });
//
// `stem-guest-js build tasks.js -o tasks.wasm` bundles the module with this SDK and turns it
// into a component that `stem-host task upload` accepts. A handler receives the decoded JSON
// arguments and a TaskContext, and ends a run by:
// - returning a value: the task succeeded, with the value as its JSON result;
// - arguments that do not match `params`, or `throw new Reject(...)`: rejected, never retried;
// - `throw new Retry(message, { after: 5 })`: run again in 5 seconds (counts as an attempt);
// - throwing anything else: the run failed, with the error's stack as its error; the worker
//   retries it while retries are left.
// The module is evaluated once, when the component is built; every run starts from that state
// in a fresh instance. Handlers are synchronous.

import { definition, durationMs } from './options.js';

export { OptionError } from './options.js';

const tasks = new Map();

export class Reject extends Error {
  name = 'Reject';
}

export class Retry extends Error {
  name = 'Retry';

  constructor(message = '', { after = 1 } = {}) {
    super(message);
    this.afterMs = durationMs('retry', 'after', after);
  }
}

/** The host refused a request: a sub-task, a canvas or a secret. */
export class StemError extends Error {
  name = 'StemError';
}

/**
 * Declares the task `options.name`. Options, as the Rust SDK's `#[task]`: queue, priority,
 * maxRetries, retryBackoff, retryBackoffMax, retryJitter, softTimeLimit, timeLimit, rateLimit,
 * memoryLimit, argsEncoder, resultEncoder, outbound, secrets, dirs, description; and `params`,
 * the expected arguments: `{ field: 'string' | 'number' | 'integer' | 'boolean' | 'object' |
 * 'array' | 'any' }`, a trailing `?` for an optional field. Without `params` the handler gets
 * whatever JSON arrived.
 */
export function task(options, handler) {
  if (typeof handler !== 'function') {
    throw new TypeError(`task \`${options?.name}\`: the second argument must be the handler function`);
  }
  const declared = definition(options);
  if (tasks.has(declared.name)) throw new Error(`task \`${declared.name}\` is declared twice`);
  const params = options.params === undefined ? undefined : checkParams(declared.name, options.params);
  tasks.set(declared.name, { declared, params, handler });
  return handler;
}

const KINDS = ['string', 'number', 'integer', 'boolean', 'object', 'array', 'any'];

function checkParams(name, params) {
  if (typeof params !== 'object' || params === null || Array.isArray(params)) {
    throw new Error(`task \`${name}\`: params must be an object of field types`);
  }
  return Object.entries(params).map(([field, kind]) => {
    const optional = typeof kind === 'string' && kind.endsWith('?');
    const base = optional ? kind.slice(0, -1) : kind;
    if (!KINDS.includes(base)) {
      throw new Error(`task \`${name}\`: params.${field} \`${kind}\` is not one of ${KINDS.join(', ')} (with ? for optional)`);
    }
    return { field, kind: base, optional };
  });
}

function kindOf(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (Number.isInteger(value)) return 'integer';
  return typeof value;
}

function matches(kind, value) {
  const actual = kindOf(value);
  return kind === 'any' || kind === actual || (kind === 'number' && actual === 'integer');
}

class BadArguments extends Error {}

function decode(entry, text) {
  let args;
  try {
    args = JSON.parse(text);
  } catch (error) {
    throw new BadArguments(`the arguments are not JSON: ${error.message}`);
  }
  if (!entry.params) return args;
  if (kindOf(args) !== 'object') {
    throw new BadArguments(`the arguments are ${kindOf(args)}, expected an object`);
  }
  const known = new Set(entry.params.map((p) => p.field));
  const unknown = Object.keys(args).filter((field) => !known.has(field));
  if (unknown.length) throw new BadArguments(`unknown argument(s) ${unknown.join(', ')}`);
  for (const { field, kind, optional } of entry.params) {
    const value = args[field];
    if (value === undefined) {
      if (!optional) throw new BadArguments(`missing argument \`${field}\``);
    } else if (!matches(kind, value)) {
      throw new BadArguments(`\`${field}\` is ${kindOf(value)}, expected ${kind}`);
    }
  }
  return args;
}

/** What a running task knows about its invocation, and its line to the host. */
export class TaskContext {
  #host;

  constructor(host, invocation) {
    this.#host = host;
    /** The id of this task, stable across retries. */
    this.id = invocation.id;
    this.name = invocation.name;
    /** 1 for the first run, 2 for the first retry, and so on. */
    this.attempt = invocation.attempt;
    this.headers = Object.fromEntries(invocation.headers);
  }

  log(level, message) {
    this.#host.log(level, String(message));
  }

  debug(message) { this.log('debug', message); }

  info(message) { this.log('info', message); }

  warn(message) { this.log('warn', message); }

  error(message) { this.log('error', message); }

  /** Reports progress (0-100); counts as a heartbeat. */
  progress(percent, message = '') {
    this.#host.progress(Math.max(0, Math.min(100, Math.trunc(percent))), String(message));
  }

  heartbeat() { this.#host.heartbeat(); }

  /** True once the task was revoked: a task that checks can stop cleanly. */
  isRevoked() { return this.#host.isRevoked(); }

  /** True once the soft time limit passed: time to wrap up before the hard limit. */
  softTimeLimitExceeded() { return this.#host.softTimeLimitExceeded(); }

  /** Enqueues the task `name` with `args` and returns its id; `countdown` delays it. */
  enqueue(name, args = {}, { queue, priority, countdown } = {}) {
    const countdownMs = countdown === undefined ? undefined : BigInt(durationMs(name, 'countdown', countdown));
    return this.#refused(`cannot enqueue sub-task \`${name}\``, () =>
      this.#host.enqueue(name, JSON.stringify(args), { queue, priority, countdownMs }),
    );
  }

  /** Submits a canvas built with `stem-guest/canvas` as a child of this task; returns its id. */
  submit(node) {
    const spec = typeof node?.spec === 'function' ? node.spec() : node;
    return this.#refused('cannot submit the canvas', () => this.#host.submitCanvas(JSON.stringify(spec)));
  }

  /** The value of a secret this task declares and an operator granted (masked by the host). */
  secret(name) {
    return this.#refused(`cannot read secret \`${name}\``, () => this.#host.secret(name));
  }

  #refused(what, call) {
    try {
      return call();
    } catch (error) {
      throw new StemError(`${what}: ${error?.payload ?? error?.message ?? error}`);
    }
  }
}

/** The definitions `describe` reports. */
export function definitions() {
  return [...tasks.values()].map((entry) => entry.declared);
}

/**
 * Runs one invocation; returns `{ ok: json }` or `{ fail | reject: message }` or
 * `{ retry: { afterMs, message } }`.
 */
export function runTask(host, invocation) {
  const entry = tasks.get(invocation.name);
  if (!entry) return { reject: `this component has no task \`${invocation.name}\`` };
  let args;
  try {
    args = decode(entry, invocation.args);
  } catch (error) {
    if (error instanceof BadArguments) return { reject: `task \`${invocation.name}\`: ${error.message}` };
    throw error;
  }
  let result;
  try {
    result = entry.handler(args, new TaskContext(host, invocation));
  } catch (error) {
    if (error instanceof Reject) return { reject: error.message };
    if (error instanceof Retry) return { retry: { afterMs: error.afterMs, message: error.message } };
    return { fail: describeError(error) };
  }
  if (result instanceof Promise) {
    return { fail: `task \`${invocation.name}\` returned a Promise: handlers must be synchronous` };
  }
  let encoded;
  try {
    encoded = JSON.stringify(result === undefined ? null : result);
  } catch (error) {
    return { fail: `task \`${invocation.name}\` returned a value JSON cannot encode: ${error.message}` };
  }
  return { ok: encoded };
}

function describeError(error) {
  if (error instanceof Error) {
    const stack = error.stack ? `\n${error.stack.trimEnd()}` : '';
    return `${error.name}: ${error.message}${stack}`;
  }
  return `thrown: ${typeof error === 'string' ? error : JSON.stringify(error) ?? String(error)}`;
}
