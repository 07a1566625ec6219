"""The harvest job: load an SAE and its model, stream a corpus through both into a `HarvestState`, and write
the result into the catalog through the store. With --shard i/n each shard saves its partial state to a folder,
and the shard that completes the set merges them (exactly the unsharded result) under an advisory lock."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from interp.store.harvest import write_harvest
from interp.store.saes import SAEMeta, lock_session, name_taken, sae_id
from interp.store.vocab import store_vocab, vocab_key
from sae.configs import HarvestConfig
from sae.errors import InputError

if TYPE_CHECKING:
    from sae.harvest import Checkpoint


def tokenizer_vocab(tokenizer) -> list[str]:
    """Every token id decoded on its own, as a snippet shows it."""
    n = len(tokenizer)
    toks = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    return [t.replace("\x00", "\\x00") for t in toks]



def _shard_file(state_dir, i: int, n: int) -> Path:
    return Path(state_dir) / f"shard-{i}-of-{n}.pt"


def _meta(sae, sae_path: str, sha: str) -> SAEMeta:
    from sae.formats import read_cfg

    c = sae.cfg
    try:
        metrics = read_cfg(sae_path).get("metrics") or {}
    except Exception:  # noqa: BLE001 - metrics are optional decoration
        metrics = {}
    return SAEMeta(model=c.model, layer=c.layer, site=c.site, d_in=c.d_in, n_features=c.n_latents, arch=c.arch,
                   k=c.k, path=str(Path(sae_path).resolve()), metrics=metrics if isinstance(metrics, dict) else {},
                   weights_sha=sha)


def _logits(hm, sae, n_logits: int):
    """For causal LMs, each decoder row through the unembedding: the tokens a feature promotes and suppresses."""
    from sae.harvest import logit_tokens
    from sae.models import is_causal

    if not is_causal(hm.model):
        return None
    W_U = hm.model.get_output_embeddings().weight
    return logit_tokens(sae.W_dec.detach(), W_U.detach(), n_logits) if W_U.shape[1] == sae.cfg.d_in else None


def _claim_merge(conn, name: str, state, folder: Path, i: int, n: int, ck: Checkpoint | None) -> dict | None:
    """Saves this shard's state (its progress checkpoint then goes), then, under the name's merge lock, merges
    every shard's state into `state` and returns None; or returns why this shard does not merge (another did,
    or some are still missing)."""
    from sae.harvest import HarvestState

    folder.mkdir(parents=True, exist_ok=True)
    target = _shard_file(folder, i, n)
    state.save(target)  # a shard file is either complete or absent
    if ck:
        ck.path.unlink(missing_ok=True)
    # saved before the lock, checked under it: of shards finishing together exactly one merges
    lock_session(conn, "harvest-merge:" + name)
    if not target.exists():
        return {"merged_by": "another shard"}
    missing = [j for j in range(n) if not _shard_file(folder, j, n).exists()]
    if missing:
        return {"waiting_for": missing}
    for j in range(n):
        if j != i:
            state.merge(HarvestState.load(_shard_file(folder, j, n)))
    return None


def harvest_to_catalog(sae_path: str, name: str, corpus: str, tokens: int, *, cfg: HarvestConfig | None = None,
                       shard: str | None = None, replace: bool = False, device: str = "auto",
                       batch_size: int = 16, state_dir: str | None = None, progress: bool = True,
                       url: str | None = None, checkpoint_every: float = 300.0) -> dict:
    """Harvests an SAE directory over a corpus into the catalog as NAME; returns the --json summary.

    With --shard i/n the shard's partial state goes to state_dir. Each shard then takes a session advisory
    lock on NAME and looks again: the one that finds all n states merges them (exactly the unsharded result),
    writes the catalog and deletes the states before letting go; a shard that finds its own state gone was
    merged by another, and one that finds states missing waits for their shards.

    Every `checkpoint_every` seconds (0: never) the harvest saves its progress to the same folder, and a harvest
    of the same SAE, corpus and arguments started after a crash or a kill goes on from there. The checkpoint is
    deleted once the shard's state is saved or the catalog written."""
    from interp.db import connect, migrate
    from sae.formats import load_sae
    from sae.harvest import Checkpoint, harvest, parse_shard
    from sae.models import hooked

    t0 = time.perf_counter()
    i, n = parse_shard(shard)
    cfg = cfg or HarvestConfig()
    conn = connect(url)  # before the model loads: a missing database fails in a second, naming its URL
    try:  # closing the connection also releases the shards' merge lock, however this ends
        migrate(conn)
        if sae_id(conn, name) is not None and not replace:
            raise name_taken(name)
        sae = load_sae(sae_path, "cpu").eval()
        sha = sae.firing_sha()
        if not sae.cfg.model:
            raise InputError(f"the SAE in {sae_path} does not say which model it reads; its cfg.json needs model/layer/site")
        hm = hooked(sae.cfg.model, sae.cfg.layer, sae.cfg.site, device)
        sae = sae.to(hm.device)
        folder = Path(state_dir or f"runs/harvest-{name}")
        ck = Checkpoint(folder / f"progress-{i}-of-{n}.pt", sha, checkpoint_every) if checkpoint_every > 0 else None
        state = harvest(hm, sae, corpus, tokens, cfg, batch_size=batch_size, shard=(i, n), progress=progress,
                        checkpoint=ck)
        resumed = state.resumed_tokens
        if n > 1 and (why := _claim_merge(conn, name, state, folder, i, n, ck)) is not None:
            return {"features": sae.cfg.n_latents, "examples": 0, "tokens": state.n_tokens,
                    "seconds": round(time.perf_counter() - t0, 2), "shard": f"{i}/{n}", "resumed_tokens": resumed,
                    **why}
        vocab = tokenizer_vocab(hm.tokenizer)
        key = vocab_key(sae.cfg.model, vocab)
        store_vocab(conn, key, vocab)
        info = {"corpus": corpus, "requested_tokens": tokens, "tokens": state.n_tokens, "ctx": cfg.window, "ctx_len": cfg.ctx_len,
                "top": cfg.top_k, "shards": n, "seed": cfg.seed}
        out = write_harvest(conn, name, _meta(sae, sae_path, sha), state.result_chunks(_logits(hm, sae, cfg.n_logits)),
                            tokenizer=key, harvest_info=info, replace=replace)
        if n > 1:  # still under the lock: a shard that looks next finds its state gone, i.e. merged
            for j in range(n):
                _shard_file(folder, j, n).unlink(missing_ok=True)
        elif ck:
            ck.path.unlink(missing_ok=True)
        return {"features": out["features"], "examples": out["examples"], "tokens": state.n_tokens,
                "seconds": round(time.perf_counter() - t0, 2), "labels_kept": out["labels_kept"],
                "duplicates_dropped": state.duplicates_dropped, "resumed_tokens": resumed}
    finally:
        conn.close()
