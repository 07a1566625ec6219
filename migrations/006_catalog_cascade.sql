-- Issue 13: the harvest tables lose their per-row foreign keys to saes. COPY checked every row against saes
-- with one trigger call per row, about a quarter of the server's time in a harvest load. Rows reach these
-- tables only through write_harvest, in the transaction that creates or locks their SAE's row, so the check
-- guarded nothing that can happen; deleting an SAE still deletes its rows, now once per statement.
ALTER TABLE features DROP CONSTRAINT IF EXISTS features_sae_id_fkey;
ALTER TABLE contexts DROP CONSTRAINT IF EXISTS contexts_sae_id_fkey;
ALTER TABLE examples DROP CONSTRAINT IF EXISTS examples_sae_id_fkey;

CREATE OR REPLACE FUNCTION saes_delete_catalog() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM examples WHERE sae_id IN (SELECT id FROM gone);
    DELETE FROM contexts WHERE sae_id IN (SELECT id FROM gone);
    DELETE FROM features WHERE sae_id IN (SELECT id FROM gone);
    RETURN NULL;
END $$;

CREATE TRIGGER saes_delete_catalog AFTER DELETE ON saes REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION saes_delete_catalog();
