// The component's `handler` export and its line to the host's `context` interface. Only the
// build's entry module imports this file: `stem:task/context` exists inside a component alone.

import * as context from 'stem:task/context@0.2.0';
import { definitions, runTask } from './index.js';

const host = {
  log: (level, message) => context.log(level, message),
  progress: (percent, message) => context.progress(percent, message),
  heartbeat: () => context.heartbeat(),
  isRevoked: () => context.isRevoked(),
  softTimeLimitExceeded: () => context.softTimeLimitExceeded(),
  enqueue: (name, args, options) => context.enqueue(name, args, options),
  submitCanvas: (spec) => context.submitCanvas(spec),
  secret: (name) => context.secret(name),
};

/** A run's `task-error`: the bindings lower a thrown error's `payload` as the `err` case. */
class TaskError extends Error {
  constructor(payload) {
    super(payload.tag);
    this.payload = payload;
  }
}

export const handler = {
  describe() {
    return definitions();
  },

  run(invocation) {
    const outcome = runTask(host, invocation);
    if ('ok' in outcome) return outcome.ok;
    if ('retry' in outcome) {
      const { afterMs, message } = outcome.retry;
      throw new TaskError({ tag: 'retry', val: { afterMs: BigInt(afterMs), message } });
    }
    if ('reject' in outcome) throw new TaskError({ tag: 'reject', val: outcome.reject });
    throw new TaskError({ tag: 'fail', val: outcome.fail });
  },
};
