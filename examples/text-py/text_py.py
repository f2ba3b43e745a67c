"""Text and data tasks in Python, on the standard library alone: word statistics of a text and
a summary of one column of a CSV document."""

import csv
import io
import re
import statistics
from collections import Counter

from stem_guest import Reject, TaskContext, task

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


@task(name="text.stats", time_limit="30s", memory_limit="128MiB")
def stats(ctx: TaskContext, text: str, top: int = 5) -> dict:
    """Counts the words of a text: total, distinct, the most frequent, sentences and the mean
    word length."""
    if top < 0:
        raise Reject("top must not be negative")
    words = [word.lower() for word in _WORD.findall(text)]
    ctx.info(f"{len(words)} words in {len(text)} characters")
    return {
        "words": len(words),
        "distinct": len(set(words)),
        "top": [[word, count] for word, count in Counter(words).most_common(top)],
        "sentences": len(_SENTENCE_END.findall(text)) or (1 if words else 0),
        "mean_word_length": round(statistics.fmean(map(len, words)), 2) if words else 0,
    }


@task(name="csv.summary", max_retries=0)
def summary(ctx: TaskContext, document: str, column: str) -> dict:
    """Summarises one numeric column of a CSV document with a header row."""
    rows = list(csv.DictReader(io.StringIO(document)))
    if not rows:
        raise Reject("the document has no data rows")
    if column not in rows[0]:
        raise Reject(f"no column `{column}`; the columns are {', '.join(rows[0])}")
    values = []
    for number, row in enumerate(rows, start=2):
        try:
            values.append(float(row[column]))
        except (TypeError, ValueError):
            raise Reject(f"line {number}: `{row[column]}` in `{column}` is not a number") from None
        if number % 1000 == 0:
            ctx.progress(min(99, number * 100 // len(rows)), "reading")
    return {
        "rows": len(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }
