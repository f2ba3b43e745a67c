// Text tasks in JavaScript, on the language's built-ins alone: URL slugs and reading time.
// The engine inside a component has no ICU: no `Intl` and no `String.prototype.normalize`,
// and no Unicode property escapes in regular expressions, so accents are folded with a table
// of their own and words are Latin letters and digits.

import { Reject, task } from 'stem-guest';

const FOLDED = {
  a: 'àáâãäåā', c: 'çćč', e: 'èéêëēė', i: 'ìíîïī', n: 'ñń', o: 'òóôõöøō', s: 'śš', u: 'ùúûüū',
  y: 'ýÿ', z: 'źżž', ae: 'æ', oe: 'œ', ss: 'ß',
};
const FOLD = new Map(
  Object.entries(FOLDED).flatMap(([plain, accented]) => [...accented].map((letter) => [letter, plain])),
);

task(
  {
    name: 'slug.make',
    description: 'Turns a title into a URL slug: ASCII letters and digits joined by dashes.',
    params: { title: 'string', max: 'integer?' },
    timeLimit: '10s',
  },
  ({ title, max = 60 }, ctx) => {
    if (max < 1) throw new Reject('max must be at least 1');
    const slug = [...title.toLowerCase()]
      .map((letter) => FOLD.get(letter) ?? letter)
      .join('')
      .replace(/[^a-z0-9]+/g, '-')
      .replace(/^-+|-+$/g, '')
      .slice(0, max)
      .replace(/-+$/, '');
    ctx.debug(`slug of ${title.length} characters: ${slug}`);
    return { slug, truncated: slug.length === max };
  },
);

task(
  {
    name: 'slug.reading-time',
    description: 'Words, sentences and minutes to read a text at `wpm` words a minute.',
    params: { text: 'string', wpm: 'integer?' },
  },
  ({ text, wpm = 230 }) => {
    if (wpm < 1) throw new Reject('wpm must be at least 1');
    const words = (text.match(/[A-Za-z0-9\u00C0-\u024F]+(?:['’][A-Za-z\u00C0-\u024F]+)*/g) ?? []).length;
    const sentences = (text.match(/[.!?]+(\s|$)/g) ?? []).length || (words ? 1 : 0);
    return { words, sentences, minutes: Math.max(1, Math.ceil(words / wpm)) };
  },
);
