-- sha256 of the SAE's loaded weights: `interp harvest --replace` keeps an SAE's labels (explanations, scores)
-- when the weights are unchanged, since they still describe the same features; NULL never matches.
ALTER TABLE saes ADD COLUMN weights_sha text;
