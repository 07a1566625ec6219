-- Harvest jobs (issue 13): `interp harvest --shards N --queue Q` queues one job item per shard (feature = the
-- shard's index, sae_id 0) before the SAE has a catalog row, so a harvest job has no sae_id: its name is in
-- params->>'sae'. Labelling jobs keep theirs.
ALTER TABLE jobs ALTER COLUMN sae_id DROP NOT NULL;
ALTER TABLE jobs ADD CONSTRAINT jobs_sae_id_kind CHECK (sae_id IS NOT NULL OR kind = 'harvest');
