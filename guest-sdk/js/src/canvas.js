// Chains, groups and chords a task submits as its child (the README's Canvas section).
//
//   import { task as step, chord } from 'stem-guest/canvas';
//   ctx.submit(chord(weeks.map((week) => step('reports.render', { week })),
//                    step('billing.email-receipt', { to: 'finance@example.com' }).queue('emails')));

export class Node {
  #spec;

  constructor(spec) {
    this.#spec = spec;
  }

  spec() {
    return this.#spec;
  }

  queue(queue) {
    this.#spec.queue = queue;
    return this;
  }

  priority(priority) {
    this.#spec.priority = priority;
    return this;
  }

  maxRetries(maxRetries) {
    this.#spec.max_retries = maxRetries;
    return this;
  }

  /** The step does not receive the previous step's result as `input`. */
  immutable() {
    this.#spec.immutable = true;
    return this;
  }

  /** A task that receives this node's result as `input`. */
  link(callback) {
    this.#spec.link = callback.spec();
    return this;
  }

  /** A task that receives this node's error as `error`. */
  linkError(callback) {
    this.#spec.link_error = callback.spec();
    return this;
  }
}

export const task = (name, args = {}) => new Node({ task: name, args });
export const chain = (steps) => new Node({ chain: steps.map((step) => step.spec()) });
export const group = (members) => new Node({ group: members.map((member) => member.spec()) });
export const chord = (header, callback) =>
  new Node({ chord: { header: header.map((node) => node.spec()), callback: callback.spec() } });
