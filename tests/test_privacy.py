"""The privacy transform: calibration against dp-accounting and an independent formula, noise statistics,
clipping, the ledger's composition, refused settings, and noise keyed by row (not by batch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from nesa_hpc.privacy.mechanism import (
    NOISE_KEYING,
    Ledger,
    PrivacyConfigError,
    PrivacySpec,
    clip_norms,
    gaussian_sigma,
    make_privacy,
    unit_norms,
)


def _delta_of(sigma: float, eps: float, sensitivity: float) -> float:
    """Balle & Wang (2018), Theorem 8: the exact delta of the Gaussian mechanism at epsilon, written out here
    independently of dp-accounting."""
    a = sensitivity / (2 * sigma)
    b = eps * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)


@pytest.mark.parametrize("eps,delta,clip", [(0.5, 1e-5, 1.0), (1.0, 1e-6, 3.0), (8.0, 1e-5, 0.25),
                                            (50.0, 1e-3, 10.0)])
def test_sigma_matches_dp_accounting_and_the_closed_form(eps, delta, clip):
    from dp_accounting import get_sigma_gaussian

    sigma = gaussian_sigma(eps, delta, 2 * clip)
    assert sigma == pytest.approx(2 * clip * get_sigma_gaussian(eps, delta), rel=1e-12)
    # the calibrated sigma meets delta exactly (to the solver's tolerance) with sensitivity 2C
    assert _delta_of(sigma, eps, 2 * clip) == pytest.approx(delta, rel=1e-6)
    # and 1% less noise would break the guarantee
    assert _delta_of(sigma * 0.99, eps, 2 * clip) > delta
    # the classic bound sigma >= sqrt(2 ln(1.25/delta)) * sens / eps (eps < 1) is looser than the analytic one
    if eps < 1:
        assert sigma < math.sqrt(2 * math.log(1.25 / delta)) * 2 * clip / eps


def test_privacy_object_uses_replace_one_sensitivity():
    p = make_privacy(PrivacySpec("gaussian", unit="sequence", epsilon=2.0, delta=1e-5, clip=3.0, seed=1), k=2)
    assert p.clip == 3.0
    assert p.sigma == pytest.approx(gaussian_sigma(2.0, 1e-5, 6.0))
    assert p.ledger().epsilon(1) == pytest.approx(2.0, rel=1e-3)


def test_noise_std_within_two_percent_and_padding_is_zero():
    p = make_privacy(PrivacySpec("gaussian", unit="sequence", epsilon=1.0, delta=1e-5, clip=1.0, seed=3), k=1)
    z = torch.zeros(8, 64, 96)
    mask = torch.ones(8, 64, dtype=torch.long)
    mask[:, 50:] = 0
    out = p.apply(z, mask, torch.arange(8))
    real = out[mask.bool()]
    assert abs(float(real.std()) / p.sigma - 1) < 0.02
    assert abs(float(real.mean())) < 0.02 * p.sigma
    assert torch.all(out[~mask.bool()] == 0)
    assert p.releases == {r: 1 for r in range(8)}


@pytest.mark.parametrize("unit", ["token", "sequence"])
def test_clipping_bounds_every_unit(unit):
    torch.manual_seed(0)
    z = torch.randn(5, 7, 16) * torch.rand(5, 7, 1) * 10
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[0, 4:] = 0
    clipped = clip_norms(z, mask, unit, 2.5)
    norms = unit_norms(clipped, mask, unit)
    assert torch.all(norms <= 2.5 + 1e-5)
    before = unit_norms(z, mask, unit)
    small = before <= 2.5
    assert torch.allclose(norms[small], before[small])  # units already inside the ball are untouched
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], 2.5))
    assert torch.all(clipped[0, 4:] == 0)


def test_ledger_composition_equals_one_release_at_sigma_over_sqrt_k():
    from dp_accounting import get_epsilon_gaussian

    nm, delta = 3.0, 1e-5
    ledger = Ledger("gaussian", delta, nm, None)
    for k in (1, 4, 16, 64):
        exact = get_epsilon_gaussian(nm / math.sqrt(k), delta)
        assert ledger.epsilon(k) == pytest.approx(exact, rel=2e-3, abs=1e-3)
    assert ledger.epsilon(0) == 0.0
    assert ledger.per_row([1, 4]).tolist() == [ledger.epsilon(1), ledger.epsilon(4)]
    assert Ledger("none", None, None, None).epsilon(1) == math.inf
    assert math.isnan(Ledger("sigma", None, None, None).epsilon(1))
    assert Ledger("dchi", None, None, 5.0).epsilon(3) == 15.0


def test_budget_for_several_releases():
    spec = PrivacySpec("gaussian", unit="sequence", epsilon=4.0, delta=1e-5, clip=1.0, seed=0, releases=9)
    p = make_privacy(spec, k=3)
    one = gaussian_sigma(4.0, 1e-5, 2.0)
    assert p.sigma == pytest.approx(3 * one)
    assert p.ledger().epsilon(9) == pytest.approx(4.0, rel=2e-3)
    assert p.ledger().epsilon(1) < 4.0


def test_noise_is_keyed_by_row_not_by_batch():
    spec = PrivacySpec("gaussian", unit="token", epsilon=1.0, delta=1e-5, clip=1.0, seed=11)
    z = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    batch = make_privacy(spec, 0).apply(z, mask, torch.tensor([4, 9, 2]))
    # row 9 alone, unpadded, gets the same values at its real positions
    alone = make_privacy(spec, 0).apply(z[1:2, :3], mask[1:2, :3], torch.tensor([9]))
    assert torch.equal(alone[0], batch[1, :3])
    # row 2 left-padded in the batch, unpadded alone
    alone = make_privacy(spec, 0).apply(z[2:3, 2:], mask[2:3, 2:], torch.tensor([2]))
    assert torch.equal(alone[0], batch[2, 2:])
    # another release of the same row, another seed, or the OS key: other noise
    again = make_privacy(spec, 0).apply(z[1:2, :3], mask[1:2, :3], torch.tensor([9]), releases=1)
    assert not torch.equal(again[0], batch[1, :3])
    other = make_privacy(PrivacySpec(**{**spec.__dict__, "seed": 12}), 0).apply(z, mask, torch.tensor([4, 9, 2]))
    assert not torch.equal(other, batch)
    os1 = make_privacy(PrivacySpec(**{**spec.__dict__, "seed": None}), 0)
    os2 = make_privacy(PrivacySpec(**{**spec.__dict__, "seed": None}), 0)
    assert os1.key != os2.key and len(os1.key) == 32


def test_noise_is_keyed_by_the_rows_content():
    """Issue 28 (c): a row edited between a stopped run and its resume is re-sent with fresh noise, not the
    noise of its earlier version (Z1 - Z2 would be the exact clean difference). The digest depends on what
    the row releases (its real tokens, its scored continuation, its request's settings), not on its
    padding or its batch."""
    from nesa_hpc.io.batch import Batch, position_ids
    from nesa_hpc.io.inputs import Request

    def batch(seqs, padding="right", prompt_tokens=None, requests=None):
        T = max(len(q) for q in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, q in enumerate(seqs):
            sl = slice(T - len(q), T) if padding == "left" else slice(0, len(q))
            ids[i, sl], mask[i, sl] = torch.tensor(q), 1
        lengths = mask.sum(1)
        return Batch(0, torch.arange(len(seqs)), ids, mask, position_ids(mask), lengths,
                     torch.zeros(len(seqs), dtype=torch.bool), prompt_tokens, requests)

    d = batch([[5, 6, 7], [8, 9], [5, 6, 7, 1]]).digests()
    assert len(set(d)) == 3 and all(len(x) == 16 for x in d)
    assert batch([[1, 2, 3, 4, 5], [5, 6, 7]], padding="left").digests()[1] == d[0]  # other padding, other batch
    assert batch([[5, 6, 7]]).row(0).digests() == batch([[5, 6, 7]]).digests()
    assert batch([[5, 6, 7]], prompt_tokens=torch.tensor([1])).digests()[0] != d[0]  # where scoring starts
    hot, cold = (Request(text="x", options=(("temperature", t),)) for t in (0.0, 0.9))
    assert batch([[5, 6, 7]], requests=[hot]).digests() != batch([[5, 6, 7]], requests=[cold]).digests()

    spec = PrivacySpec("gaussian", unit="token", epsilon=1.0, delta=1e-5, clip=1.0, seed=3)
    z, mask, rows = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long), torch.tensor([4])
    first = make_privacy(spec, 0).apply(z, mask, rows, digests=[d[0]])
    assert torch.equal(make_privacy(spec, 0).apply(z, mask, rows, digests=[d[0]]), first)  # a replay: same noise
    assert not torch.equal(make_privacy(spec, 0).apply(z, mask, rows, digests=[d[2]]), first)  # an edit: fresh
    assert not torch.equal(make_privacy(spec, 0).apply(z, mask, rows), first)


def test_the_owner_keys_every_release_with_the_rows_content():
    """Every release leaves rank 0 through ``Owner.front``, which takes the rows' digests as a required
    argument, and the results file records the keying (a file of a version that keyed the noise otherwise
    is not resumed with other noise)."""
    import inspect

    from nesa_hpc.engine.owner import Owner
    from nesa_hpc.infer.files import privacy_key

    digests = inspect.signature(Owner.front).parameters["digests"]
    assert digests.kind is inspect.Parameter.KEYWORD_ONLY and digests.default is inspect.Parameter.empty
    noisy = PrivacySpec("gaussian", unit="token", epsilon=1.0, delta=1e-5, clip=1.0)
    assert privacy_key(noisy)["privacy_noise_keying"] == NOISE_KEYING
    assert NOISE_KEYING.startswith("ChaCha20 keyed by (key, row, release, content)")
    assert "privacy_noise_keying" not in privacy_key(PrivacySpec("none"))


def test_none_is_the_identity_and_counts_releases():
    p = make_privacy("none")
    z = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert p.apply(z, mask, torch.tensor([0, 1])) is z
    assert p.releases == {0: 1, 1: 1}
    assert p.ledger().epsilon(1) == math.inf
    assert p.attrs()["privacy_epsilon"] == math.inf


def test_dchi_radius_follows_gamma():
    eps, H = 50.0, 32
    p = make_privacy(PrivacySpec("dchi", epsilon=eps, seed=5), k=0)
    z = torch.zeros(4, 500, H, dtype=torch.float64)
    noise = p.apply(z, torch.ones(4, 500, dtype=torch.long), torch.arange(4))
    radius = noise.norm(dim=-1).flatten().numpy()
    assert abs(radius.mean() / (H / eps) - 1) < 0.02  # Gamma(H, 1/eps) has mean H/eps
    direction = (noise / noise.norm(dim=-1, keepdim=True)).reshape(-1, H).numpy()
    assert np.abs(direction.mean(0)).max() < 0.05  # isotropic


@pytest.mark.parametrize("spec,k,match", [
    (PrivacySpec("gaussian", unit="token", epsilon=1, delta=1e-5, clip=1), 2, "privacy.unit=token with split.k=2"),
    (PrivacySpec("sigma", unit="token", sigma=1.0), 1, "privacy.unit=token"),
    (PrivacySpec("dchi", epsilon=1), 3, "needs split.k=0"),
    (PrivacySpec("gaussian", unit="sequence", epsilon=1, delta=1e-5, clip=None), 0, "needs privacy.clip"),
    (PrivacySpec("gaussian", unit="sequence", epsilon=None, delta=1e-5, clip=1), 0, "privacy.epsilon"),
    (PrivacySpec("gaussian", unit="sequence", epsilon=1, delta=None, clip=1), 0, "privacy.delta"),
    (PrivacySpec("sigma", sigma=None), 0, "privacy.sigma"),
])
def test_unsound_settings_are_refused(spec, k, match):
    with pytest.raises(PrivacyConfigError, match=match):
        make_privacy(spec, k)


def test_calibrated_clip_is_a_percentile_of_public_norms(tiny_models):
    from transformers import AutoTokenizer

    from nesa_hpc.io.batch import make_batches
    from nesa_hpc.io.public_text import public_texts
    from nesa_hpc.models.weights import build_adapter, load_modules
    from nesa_hpc.privacy.mechanism import calibrate_clip

    folder = str(tiny_models["llama"])
    adapter = build_adapter(folder)
    load_modules(adapter, folder, [*adapter.embed_modules, *adapter.stage_modules] +
                 [adapter.layer_module(i) for i in range(2)], "float32")
    tok = AutoTokenizer.from_pretrained(folder)
    texts = public_texts(40)
    assert len(texts) == 40 and all(isinstance(t, str) and len(t) >= 40 for t in texts)
    clip = calibrate_clip(adapter, tok, 2, "token", 50, texts)
    norms = []
    with torch.inference_mode():
        for b in make_batches(enumerate(texts), tok, 8, 128, "right"):
            h = adapter.run_layers(range(2), adapter.embed(b.ids, b.pos), b.mask, b.pos)
            norms.append(h[b.mask.bool()].norm(dim=-1))
    assert clip == pytest.approx(float(torch.cat(norms).median()), rel=0.02)


def test_ledger_stays_cheap_for_large_epsilon():
    """Little noise means epsilon in the thousands; the PLD grid follows epsilon's size instead of needing
    millions of buckets, and stays within 1e-3 relative of the closed form."""
    from dp_accounting import get_epsilon_gaussian

    ledger = Ledger("gaussian", 1e-5, 0.017, None)
    for n in (1, 6, 64):
        assert ledger.epsilon(n) == pytest.approx(get_epsilon_gaussian(0.017 / math.sqrt(n), 1e-5), rel=1e-3)


def test_clip_and_noise_run_in_float64_then_cast_and_nonfinite_values_are_zeroed():
    """bf16 activations: clipping and noise in float64, one cast at the end (the clipped norm cannot round up
    past C before the noise is added); a NaN/Inf entry is sent as zero plus noise, never as NaN."""
    spec = PrivacySpec(mechanism="sigma", unit="sequence", clip=2.0, sigma=0.5, seed=3)
    p = make_privacy(spec, 0)
    z = (torch.randn(2, 5, 16) * 10).to(torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.long)
    rows = torch.tensor([4, 9])
    got = p.apply(z, mask, rows)
    assert got.dtype == torch.bfloat16
    want = clip_norms(z.double(), mask, "sequence", 2.0)
    want = want + torch.stack([p.draw(r, 0, 5, 16) for r in (4, 9)])
    assert torch.equal(got, want.to(torch.bfloat16))
    assert unit_norms(clip_norms(z.double(), mask, "sequence", 2.0), mask, "sequence").max() <= 2.0 + 1e-12
    bad = z.clone()
    bad[0, 1, 3], bad[1, 2] = float("nan"), float("inf")
    out = p.apply(bad, mask, rows)
    assert torch.isfinite(out).all()
    zeroed = torch.nan_to_num(bad.double(), nan=0.0, posinf=0.0, neginf=0.0)
    want = clip_norms(zeroed, mask, "sequence", 2.0) + torch.stack([p.draw(r, 0, 5, 16) for r in (4, 9)])
    assert torch.equal(out, want.to(torch.bfloat16))


def test_seeded_noise_claims_no_formal_guarantee():
    seeded = make_privacy(PrivacySpec(mechanism="gaussian", epsilon=8, delta=1e-5, clip=1.0, seed=0), 0)
    assert seeded.attrs()["privacy_guarantee"].startswith("no formal guarantee (seeded noise")
    os_keyed = make_privacy(PrivacySpec(mechanism="gaussian", epsilon=8, delta=1e-5, clip=1.0), 0)
    assert os_keyed.attrs()["privacy_guarantee"] == "(epsilon, delta)-DP, replace-one adjacency"


def test_noise_keys_are_new_private_files_away_from_the_results(tmp_path, monkeypatch):
    import os

    from nesa_hpc.privacy.mechanism import default_key_path, key_dir, read_key, write_key

    monkeypatch.setenv("NESA_HPC_KEYS", str(tmp_path / "keys"))
    results = tmp_path / "shared" / "out.h5"
    path = default_key_path(results)
    assert path.parent == key_dir() == tmp_path / "keys" and results.parent not in path.parents
    assert default_key_path(tmp_path / "shared" / "." / "out.h5") == path  # one key per results file
    write_key(path, b"k" * 32)
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert read_key(path) == b"k" * 32
    with pytest.raises(PrivacyConfigError, match="already exists"):  # O_EXCL: never reuses a planted file
        write_key(path, b"x" * 32)
    planted = tmp_path / "keys" / "planted"
    planted.write_bytes(b"")
    link = tmp_path / "keys" / "link.noise-key"
    link.symlink_to(planted)
    with pytest.raises(PrivacyConfigError, match="already exists"):  # a link is not followed
        write_key(link, b"x" * 32)
    with pytest.raises(PrivacyConfigError, match="cannot open"):
        read_key(link)
    os.chmod(path, 0o644)
    with pytest.raises(PrivacyConfigError, match="mode 0o644"):
        read_key(path)
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    with pytest.raises(PrivacyConfigError, match="writable by other users"):
        write_key(open_folder / "k", b"x" * 32)


@pytest.mark.parametrize("owner, ok", [(None, False), ("allow_shared", True), ("OWN", True)])
def test_training_with_noise_refuses_to_keep_owner_files_in_the_shared_folder(owner, ok, tmp_path):
    from hydra import compose, initialize_config_dir

    from nesa_hpc.config import ConfigError
    from nesa_hpc.train.options import train_spec

    conf = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")
    overrides = ["privacy=sigma", "privacy.sigma=0.1", "privacy.unit=token", "split.k=0",
                 f"train.out_dir={tmp_path / 'shared'}"]
    if owner is not None:
        overrides.append(f"train.owner_dir={tmp_path / 'own' if owner == 'OWN' else owner}")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if ok:
        spec = train_spec(cfg)
        assert spec.owner_dir == str(tmp_path / ("own" if owner == "OWN" else "shared"))
    else:
        with pytest.raises(ConfigError, match="train.owner_dir"):
            train_spec(cfg)
    # rank 0's trained layers are not covered: a merged export (every rank writes to out_dir) is refused
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides[:5], f"train.owner_dir={tmp_path / 'own'}",
                                                      "train.owner_trainable=true", "train.export=merged"])
    with pytest.raises(ConfigError, match="not covered by the guarantee"):
        train_spec(cfg)


def test_a_nan_in_rank0s_clean_states_is_not_marked_on_the_wire():
    """Side door (a): rank 0 marks NaN/Inf in its clean layer-k states for itself (``Front.own``); what leaves
    with Z are the marks of Z alone (the transform sends a non-finite value as zero), so a data-dependent
    overflow before the noise is not revealed to the workers. Without a transform Z is the clean state, and
    the marks are the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nesa_hpc.engine.owner import Owner
    from nesa_hpc.engine.topology import make_topology
    from nesa_hpc.models.adapter import make_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    adapter = make_adapter(model)
    topo = make_topology(4, 1, 2)
    ids = torch.randint(0, 64, (3, 5))
    mask, pos, rows = torch.ones(3, 5, dtype=torch.long), torch.arange(5).expand(3, 5), torch.arange(3)
    noisy = make_privacy(PrivacySpec("gaussian", unit="sequence", epsilon=4.0, delta=1e-5, clip=1.0, seed=1), k=1)
    with torch.inference_mode():
        front = Owner(topo, adapter, noisy, None).front(ids, mask, pos, rows, digests=[b"r"] * 3)
        plain = Owner(topo, adapter, make_privacy("none"), None).front(ids, mask, pos, rows, digests=[b"r"] * 3)
    assert front.own.tolist() == [0, 0, 0] and torch.isfinite(front.z).all()
    assert front.nonfinite_at.tolist() == [-1, -1, -1]
    assert plain.own.tolist() == plain.nonfinite_at.tolist() == [0, 0, 0]


def test_owner_files_stay_off_file_systems_the_workers_mount(tmp_path, monkeypatch):
    """Side doors (e) and (f): with noise on and a worker on another host, a results file on a network file
    system is refused unless output.allow_shared, and so is the noise key's default folder there; a key
    folder or key path the user chose is taken as it is; one host, or no noise, checks nothing."""
    from dataclasses import replace

    from nesa_hpc.config import ConfigError
    from nesa_hpc.infer.files import check_owner_paths
    from nesa_hpc.io.fs import network_fs

    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    mounts = f"/dev/sda1 / ext4 rw 0 0\nserver:/export {shared} nfs4 rw 0 0\n"
    assert network_fs(shared / "out.h5", mounts) == "nfs4" and network_fs(local / "out.h5", mounts) is None
    monkeypatch.delenv("NESA_HPC_KEYS", raising=False)
    monkeypatch.setenv("NESA_HPC_CACHE", str(local))
    noisy = PrivacySpec("gaussian", unit="sequence", epsilon=4.0, delta=1e-5, clip=1.0)
    settings = _settings(privacy=noisy, output_path=str(shared / "out.h5"))
    two_hosts = ["owner-node", "worker-node"]
    with pytest.raises(ConfigError, match=r"is on a nfs4 file system, which the workers' nodes \(worker-node\)"):
        check_owner_paths(settings, two_hosts, mounts)
    check_owner_paths(replace(settings, allow_shared=True), two_hosts, mounts)
    check_owner_paths(settings, ["owner-node", "owner-node"], mounts)  # every rank on rank 0's host
    check_owner_paths(replace(settings, privacy=PrivacySpec("none")), two_hosts, mounts)
    # the default key folder on the shared file system
    monkeypatch.setenv("NESA_HPC_CACHE", str(shared))
    at_home = replace(settings, output_path=str(local / "out.h5"))
    with pytest.raises(ConfigError, match="the noise key .* would be kept in .* set privacy.key_path"):
        check_owner_paths(at_home, two_hosts, mounts)
    check_owner_paths(replace(at_home, privacy=replace(noisy, key_path=str(local / "k"))), two_hosts, mounts)
    check_owner_paths(replace(at_home, privacy=replace(noisy, seed=3)), two_hosts, mounts)  # no key kept
    monkeypatch.setenv("NESA_HPC_KEYS", str(shared / "keys"))  # a folder the user chose
    check_owner_paths(at_home, two_hosts, mounts)


def _settings(**changes):
    from dataclasses import replace

    from hydra import compose, initialize_config_dir

    from nesa_hpc.config import settings_from_cfg
    from nesa_hpc.overrides import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        settings = settings_from_cfg(compose(config_name="infer"))
    return replace(settings, **changes)
