-- Labelling jobs on Celery workers: budgets, leases, chunks and failure reasons.
-- A job item is `queued` (pending) until a worker claims it (`running`, with a lease in lease_until) and then
-- `done` or `failed` (reason: a short category counted by `interp jobs`; error: the full line). A queued item
-- whose chunk was sent to the broker holds a lease too, so a message the broker lost is sent again when it expires.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled'));
ALTER TABLE jobs
    ADD COLUMN tokens        bigint NOT NULL DEFAULT 0,    -- LLM tokens spent, prompt + completion, retries included
    ADD COLUMN budget_tokens bigint,                       -- the job pauses when tokens reach it; NULL: no budget
    ADD COLUMN reason        text,                         -- why it is paused, failed or cancelled
    ADD COLUMN chunk_size    int NOT NULL DEFAULT 64,
    ADD COLUMN n_chunks      int NOT NULL DEFAULT 0;

ALTER TABLE job_items DROP CONSTRAINT job_items_state_check;
ALTER TABLE job_items ADD CONSTRAINT job_items_state_check
    CHECK (state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled'));
ALTER TABLE job_items
    ADD COLUMN chunk       int NOT NULL DEFAULT 0,         -- the item's position in the job / chunk_size
    ADD COLUMN lease_until timestamptz,                    -- set while its chunk is in the broker or a worker
    ADD COLUMN reason      text;

-- the sweeper's scan and the count of chunks in flight only ever see leased items, a small set
CREATE INDEX job_items_lease ON job_items (lease_until) WHERE lease_until IS NOT NULL;
CREATE INDEX job_items_inflight ON job_items (job_id, chunk) WHERE lease_until IS NOT NULL;
-- the next chunks to send: pending items not yet in the broker
CREATE INDEX job_items_pending ON job_items (job_id, chunk) WHERE state = 'queued' AND lease_until IS NULL;
