"""The Celery side of scripts/compare-celery: a no-op addition, results stored in Redis."""

import os

from celery import Celery

app = Celery("stem_compare", broker=os.environ["COMPARE_REDIS_URL"], backend=os.environ["COMPARE_REDIS_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="compare.add")
def add(a, b):
    return a + b
