-- Issue 10: explanations lose their per-row foreign key to saes, as the harvest tables did in 006. A bulk label
-- load checked every row against saes, one trigger call per row and a fifth of the load's server time. Each
-- writer (store.labels.upsert_explanations, store.bulk.copy_labels) locks its SAE's row FOR KEY SHARE first, in
-- the transaction that writes (store.saes.lock_sae), so an SAE cannot be deleted while its labels are written,
-- and a label for an SAE that is gone is refused: what the key guarded, at one check per statement. Deleting an
-- SAE still deletes its labels (their scores and embeddings follow by their own keys), once per statement.
ALTER TABLE explanations DROP CONSTRAINT IF EXISTS explanations_sae_id_fkey;

CREATE OR REPLACE FUNCTION saes_delete_catalog() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM examples WHERE sae_id IN (SELECT id FROM gone);
    DELETE FROM contexts WHERE sae_id IN (SELECT id FROM gone);
    DELETE FROM features WHERE sae_id IN (SELECT id FROM gone);
    DELETE FROM explanations WHERE sae_id IN (SELECT id FROM gone);
    RETURN NULL;
END $$;
