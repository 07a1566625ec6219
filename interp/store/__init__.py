"""The store: every SQL statement of the service, as functions that take a psycopg connection and return
typed records. Nothing outside this package runs SQL (migrations aside, in `interp.db`).

- `saes`      the SAE rows: lookup by name, listing, the "name taken" rule
- `vocab`     tokenizer vocabularies, so snippets decode without loading a model
- `harvest`   bulk-writing a harvest (binary COPY into staging, one swap transaction)
- `features`  reading features and their examples back
- `labels`    explanations and scores (idempotent upserts on the schema's unique keys)
- `jobs`      labelling and harvest jobs: items, leases, completion, summaries
- `search`    the three candidate arms of label search, and label embeddings
- `export`    the scored catalog, streamed
- `bulk`      COPY loaders for benchmarks and tests
"""
