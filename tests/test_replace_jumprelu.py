"""Against the real Postgres: a JumpReLU SAE converted to SAELens and harvested again with --replace keeps its labels.
SAELens does not record JumpReLU's training target k and the loader stands one in, so this holds only while the
catalog's SAE hash leaves k out for JumpReLU (SparseAutoencoder.firing_sha)."""
import torch

from interp.harvest_job import harvest_to_catalog
from interp.store.features import feature_view
from sae.archs import SAEConfig, build
from sae.configs import HarvestConfig
from sae.formats import convert, load_sae, save_native
from tests.helpers import URL
from tests.test_catalog_replace_shards import _add_labels, _count

HARVEST = {"corpus": "builtin", "cfg": HarvestConfig(top_k=10, window=16, ctx_len=32), "batch_size": 8,
           "device": "cpu", "progress": False, "url": URL}


def test_jumprelu_through_saelens_and_replace_keeps_labels(conn, names, tmp_path):
    name = names()
    torch.manual_seed(0)
    sae = build(SAEConfig(d_in=384, n_latents=128, arch="jumprelu", k=6, model="minilm", layer=1, site="resid"))
    with torch.no_grad():
        sae.log_threshold.copy_(torch.rand(128).mul(0.4).add(0.05).log())
    native = save_native(sae, tmp_path / "native")
    lens = convert(native, "saelens", tmp_path / "lens")
    assert load_sae(lens).cfg.k != 6  # the stand-in k is really there: the round trip is the case at stake

    first = harvest_to_catalog(str(native), name, tokens=1024, **HARVEST)
    assert first["features"] == 128 and first["examples"] > 0
    sid = _count(conn, "SELECT id FROM saes WHERE name = %s", name)
    eids = _add_labels(conn, sid, (3, 17))

    again = harvest_to_catalog(str(lens), name, tokens=1536, replace=True, **HARVEST)
    assert again["labels_kept"] == 2
    assert _count(conn, "SELECT id FROM saes WHERE name = %s", name) == sid
    assert _count(conn, "SELECT count(*) FROM scores WHERE explanation_id = ANY(%s)", eids) == 2
    v = feature_view(conn, name, 17)
    assert [(lab.label, [s.value for s in lab.scores]) for lab in v.labels] == [("label of 17", [0.75])]
