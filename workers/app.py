"""The Celery app of the labelling workers. Start one with `interp worker` or `celery -A workers.app worker`.

- The broker is CELERY_BROKER_URL: Redis by default, RabbitMQ (amqp://) by URL. There is no result backend:
  Postgres holds every result, and tasks pass ids.
- acks_late with task_reject_on_worker_lost: a message is acknowledged only after its task ran, and one whose
  worker died is given back. The writes are idempotent upserts, so a redelivered chunk duplicates nothing.
- prefetch 1: a worker holds no more messages than it runs, so a killed one strands as few as possible.
- Redis's visibility_timeout (how long an unacknowledged message waits before Redis delivers it again) is far
  above any task's run time and retry wait; a message a dead worker held is not waited for anyway: the items'
  leases in Postgres bring its chunk back within a lease (see interp.labelling.sweep).
"""
from __future__ import annotations

from celery import Celery

from interp.settings import get_settings


def make_app() -> Celery:
    s = get_settings()
    # a task may spend up to job_db_retry_s waiting for a restarted database before it writes and is acked
    if s.job_visibility_timeout_s <= 2 * s.job_db_retry_s + s.job_lease_s:
        raise RuntimeError(f"JOB_VISIBILITY_TIMEOUT_S={s.job_visibility_timeout_s} must exceed twice JOB_DB_RETRY_S "
                           "plus JOB_LEASE_S, or Redis delivers a running task a second time")
    app = Celery("workers", broker=s.celery_broker_url, include=["workers.tasks"])
    app.conf.update(
        result_backend=None, task_ignore_result=True, task_store_errors_even_if_ignored=False,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_default_queue=s.job_queue, task_serializer="json", accept_content=["json"],
        broker_transport_options={"visibility_timeout": s.job_visibility_timeout_s},
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()
