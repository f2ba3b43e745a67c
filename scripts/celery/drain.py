"""Fills a fresh Celery queue with N additions, drains it with a prefork worker of 2 processes,
and prints the rate as JSON: tasks / (last date_done - first date_done) * N / (N - 1)."""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime

import redis

from bench_app import add, app

tasks = int(sys.argv[1])
queue = f"compare-{uuid.uuid4().hex[:8]}"
ids = []
with app.producer_or_acquire() as producer:
    for i in range(tasks):
        ids.append(add.apply_async((i, 1), queue=queue, producer=producer).id)
server = redis.Redis.from_url(os.environ["COMPARE_REDIS_URL"])
worker = subprocess.Popen(
    [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-Q", queue,
     "-P", "prefork", "-c", "2", "--loglevel=warning", "--without-gossip",
     "--without-mingle", "--without-heartbeat"],
    cwd=os.path.dirname(os.path.abspath(__file__)),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    deadline = time.time() + 600
    while True:
        last = server.get(f"celery-task-meta-{ids[-1]}")
        if server.llen(queue) == 0 and last is not None:
            metas = server.mget([f"celery-task-meta-{i}" for i in ids])
            if all(m is not None for m in metas):
                break
        if time.time() > deadline:
            sys.exit("celery did not drain the queue within 10 minutes")
        time.sleep(0.2)
finally:
    worker.terminate()
    worker.wait()
done = [json.loads(m) for m in metas]
failed = sum(1 for i, m in enumerate(done) if m["status"] != "SUCCESS" or m["result"] != i + 1)
stamps = sorted(datetime.fromisoformat(m["date_done"]).timestamp() for m in done)
wall = (stamps[-1] - stamps[0]) * tasks / max(tasks - 1, 1)
print(json.dumps({"tasks": tasks, "failed": failed, "tasks_per_second": tasks / max(wall, 1e-3)}))
