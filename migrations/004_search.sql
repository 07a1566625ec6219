-- Label search (issue 10). Three candidate arms, each bounded by its own index:
--   full text: a stored tsvector on explanations.label, GIN-indexed;
--   trigram:   explanations_label_trgm (001) serves `%` / `<%` (word_similarity);
--   semantic:  label embeddings, kept here as the source of truth; the nearest-neighbour index is a usearch file
--              beside the catalog, rebuilt from this table at any time (pgvector is not available here).
-- Touches only explanations and its own tables, so it applies whether or not 003 (jobs) has run.

-- 'english'::regconfig makes to_tsvector immutable, which a generated column requires.
ALTER TABLE explanations ADD COLUMN IF NOT EXISTS label_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('english'::regconfig, coalesce(label, ''))) STORED;
CREATE INDEX IF NOT EXISTS explanations_label_tsv ON explanations USING gin (label_tsv);

-- One embedding per labelled explanation. vec is float16 little-endian (dim x 2 bytes): half of real[]'s size
-- at 10 M labels, and MiniLM's cosine ranking does not notice the rounding. seq orders the rows as they were
-- embedded, so a usearch file records "everything up to seq S" and catches up on the rest incrementally.
CREATE TABLE IF NOT EXISTS label_embeddings (
    explanation_id  bigint PRIMARY KEY REFERENCES explanations (id) ON DELETE CASCADE,
    seq             bigserial NOT NULL UNIQUE,
    model           text NOT NULL,
    dim             int NOT NULL,
    vec             bytea NOT NULL
);

-- Identifies this catalog to the usearch files built from it: a file made for another database (or for this one
-- before it was dropped and recreated) names another id and is rebuilt instead of returning foreign keys.
-- Labels waiting for an embedding, found through a partial index that holds only them: an anti-join against
-- label_embeddings would read all 10 M labels at every search to find the few new ones.
ALTER TABLE explanations ADD COLUMN IF NOT EXISTS embedded boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS explanations_unembedded ON explanations (id) WHERE label IS NOT NULL AND NOT embedded;

CREATE TABLE IF NOT EXISTS search_catalog (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    uuid    uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO search_catalog DEFAULT VALUES ON CONFLICT DO NOTHING;
