-- The trigram arm's dictionary (issue 10): every distinct word of the labels, as pg_trgm splits text into words
-- (lower case, runs of letters and digits), with its own trigram index (GiST: it orders by word_similarity
-- distance, so a query word's closest words come first).
--
-- Why: a trigram index over the labels themselves (explanations_label_trgm, 001) made the typo search read the
-- posting list of every trigram of the query, and a common trigram ("  c", " ca") is in most labels, so its
-- cost grew with the catalog (97 ms p95 at 1 M labels). A catalog's vocabulary is a few thousand to a few
-- hundred thousand words whatever its size: the query's words are matched against it, and the labels holding a
-- similar word are then found through the full-text index by that word's english lexeme.
--
-- No unique key: with one, a transaction adding a word waits for any other that added it and has not committed,
-- and two label writers adding each other's new words in different statements of their transactions (a worker
-- stores a batch of labels in one) would deadlock. Two transactions adding one new word at the same moment store
-- it twice, which the lookup does not mind.
CREATE TABLE IF NOT EXISTS label_words (word text NOT NULL);
CREATE INDEX IF NOT EXISTS label_words_word ON label_words (word);
CREATE INDEX IF NOT EXISTS label_words_trgm ON label_words USING gist (word gist_trgm_ops);

CREATE OR REPLACE FUNCTION label_words_of(t text) RETURNS SETOF text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT w FROM regexp_split_to_table(lower(t), '[^[:alnum:]]+') w WHERE w <> ''
$$;

CREATE OR REPLACE FUNCTION add_label_words(texts text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO label_words (word)
    SELECT DISTINCT w FROM unnest(texts) t, label_words_of(t) w
    WHERE NOT EXISTS (SELECT 1 FROM label_words x WHERE x.word = w)
$$;

-- Every insert adds its labels' words, once per statement (a bulk INSERT ... SELECT splits its labels in one
-- pass). A writer that adds the words itself, as `bulk.copy_labels` does from text it already holds, sets
-- interp.defer_label_words for its transaction.
CREATE OR REPLACE FUNCTION label_words_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('interp.defer_label_words', true), '') <> 'on' THEN
        PERFORM add_label_words(ARRAY(SELECT label FROM new_rows WHERE label IS NOT NULL));
    END IF;
    RETURN NULL;
END $$;

-- A stored failure replaced by a label is an UPDATE; the row trigger's WHEN keeps the far more frequent updates
-- that leave the label alone (the `embedded` flag) free of any call.
CREATE OR REPLACE FUNCTION label_words_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM add_label_words(ARRAY[NEW.label]);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS explanations_words_ins ON explanations;
CREATE TRIGGER explanations_words_ins AFTER INSERT ON explanations REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION label_words_inserted();
DROP TRIGGER IF EXISTS explanations_words_upd ON explanations;
CREATE TRIGGER explanations_words_upd AFTER UPDATE OF label ON explanations
    FOR EACH ROW WHEN (NEW.label IS NOT NULL AND NEW.label IS DISTINCT FROM OLD.label)
    EXECUTE FUNCTION label_words_updated();

INSERT INTO label_words (word)
SELECT DISTINCT w FROM explanations e, label_words_of(e.label) w WHERE e.label IS NOT NULL
EXCEPT SELECT word FROM label_words;

-- Nothing searches the labels' own trigrams any more; the index only slowed every label write.
DROP INDEX IF EXISTS explanations_label_trgm;
