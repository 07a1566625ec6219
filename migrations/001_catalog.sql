-- The catalog: SAEs, their features and example snippets, vocabularies, and the labelling tables.
-- Per-SAE data (features, contexts, examples) is HASH-partitioned on sae_id so that 10 M features
-- spread over SAEs stay in small partitions, and a whole SAE is replaced inside its partition.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE saes (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    model       text NOT NULL,
    layer       int  NOT NULL,
    site        text NOT NULL,
    d_in        int  NOT NULL,
    n_features  int  NOT NULL,
    arch        text NOT NULL,
    k           int,
    tokenizer   text,                       -- vocab.tokenizer key; snippets decode without loading a model
    metrics     jsonb NOT NULL DEFAULT '{}',  -- eval metrics (fvu, l0, ...)
    harvest     jsonb NOT NULL DEFAULT '{}',  -- how the examples were harvested (corpus, tokens, ctx, ...)
    path        text,
    created     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vocab (
    tokenizer   text NOT NULL,
    token_id    int  NOT NULL,
    token       text NOT NULL,
    PRIMARY KEY (tokenizer, token_id)
);

CREATE TABLE features (
    sae_id      int  NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    idx         int  NOT NULL,
    density     real NOT NULL,          -- fraction of harvested tokens where it fires
    n_fired     bigint NOT NULL,
    max_act     real NOT NULL,
    mean_act    real NOT NULL,          -- over the tokens where it fires
    hist        int4[] NOT NULL,        -- 50 equal-width bins over (0, hist_max]
    hist_max    real NOT NULL,          -- edges are hist_max * i / 50
    top_logits      int4[],             -- causal LMs: decoder direction through the unembedding
    top_logit_vals  real[],
    bottom_logits   int4[],
    bottom_logit_vals real[],
    PRIMARY KEY (sae_id, idx)
) PARTITION BY HASH (sae_id);

-- The corpus contexts that examples point into, stored once per SAE however many features share them.
CREATE TABLE contexts (
    sae_id      int  NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    ctx         int  NOT NULL,          -- index of the context in the harvest's corpus order
    token_ids   int4[] NOT NULL,
    PRIMARY KEY (sae_id, ctx)
) PARTITION BY HASH (sae_id);

-- One row per (feature, kind, split): the examples of that group packed into parallel arrays.
-- Example i is the window token_ids[start[i] : start[i] + width] of context ctx[i]; its activations are
-- acts[i*width : (i+1)*width] as bytes (0..255) times scale[i] / 255. Packing keeps a feature at ~4 rows
-- instead of ~120, which is what gets the catalog under 10 KB per feature.
CREATE TABLE examples (
    sae_id      int  NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    feature     int  NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('top', 'quantile', 'random')),
    split       text NOT NULL CHECK (split IN ('explain', 'score')),
    width       smallint NOT NULL,
    ctx         int4[] NOT NULL,
    start       int2[] NOT NULL,
    max_pos     int2[] NOT NULL,        -- position of the max inside the window
    quantile_bin int2[],                -- kind = 'quantile' only
    scale       real[] NOT NULL,        -- the max activation inside each window
    acts        bytea NOT NULL,
    PRIMARY KEY (sae_id, feature, kind, split)
) PARTITION BY HASH (sae_id);

DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format('CREATE TABLE features_p%s PARTITION OF features FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
        EXECUTE format('CREATE TABLE contexts_p%s PARTITION OF contexts FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
        EXECUTE format('CREATE TABLE examples_p%s PARTITION OF examples FOR VALUES WITH (MODULUS 16, REMAINDER %s)', i, i);
    END LOOP;
END $$;

CREATE TABLE explanations (
    id              bigserial PRIMARY KEY,
    sae_id          int  NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    feature         int  NOT NULL,
    explainer       text NOT NULL,      -- explainer model spec, e.g. openai:gpt-4o-mini or baseline
    prompt_version  text NOT NULL,
    label           text,               -- NULL when it failed
    is_baseline     boolean NOT NULL DEFAULT false,
    prompt_tokens   int NOT NULL DEFAULT 0,
    completion_tokens int NOT NULL DEFAULT 0,
    failure         text,
    created         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sae_id, feature, explainer, prompt_version)
);
CREATE INDEX explanations_label_trgm ON explanations USING gin (label gin_trgm_ops);

CREATE TABLE scores (
    id              bigserial PRIMARY KEY,
    explanation_id  bigint NOT NULL REFERENCES explanations (id) ON DELETE CASCADE,
    scorer          text NOT NULL,      -- simulation | detection | fuzzing | embedding
    simulator       text NOT NULL,      -- the model that scored ('' when none)
    value           real,
    method          text,               -- logprobs | json | ... : how the value was produced
    prompt_version  text,
    prompt_tokens   int NOT NULL DEFAULT 0,
    completion_tokens int NOT NULL DEFAULT 0,
    details         jsonb NOT NULL DEFAULT '{}',  -- per-example breakdown
    failure         text,
    created         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (explanation_id, scorer, simulator)
);

CREATE TABLE jobs (
    id          bigserial PRIMARY KEY,
    sae_id      int NOT NULL REFERENCES saes (id) ON DELETE CASCADE,
    kind        text NOT NULL DEFAULT 'label',
    params      jsonb NOT NULL DEFAULT '{}',
    state       text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    n_items     int NOT NULL DEFAULT 0,
    n_done      int NOT NULL DEFAULT 0,
    n_failed    int NOT NULL DEFAULT 0,
    created     timestamptz NOT NULL DEFAULT now(),
    updated     timestamptz NOT NULL DEFAULT now(),
    finished    timestamptz
);

CREATE TABLE job_items (
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sae_id      int NOT NULL,
    feature     int NOT NULL,
    state       text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts    int NOT NULL DEFAULT 0,
    error       text,
    updated     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, sae_id, feature)
);
CREATE INDEX job_items_state ON job_items (job_id, state);
