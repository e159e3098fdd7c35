"""k-NN, feature pooling, config loading, checkpoints, augmentation / sampler determinism, backbone export."""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from fovea.config.loader import dump_yaml, load_config, preset_names
from fovea.errors import ConfigError
from fovea.data.augment import CropsConfig, MultiCrop
from fovea.data.loader import EpochBatchSampler
from fovea.eval.bank import FeatureBank
from fovea.eval.knn import knn_accuracy, knn_classify
from fovea.hub.backbone import export_backbone, load_backbone
from fovea.models.vit import ViTConfig, VisionTransformer
from fovea.core.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state


# --------------------------------------------------------------------------- k-NN

def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    c, d, per = 5, 16, 20
    basis = torch.eye(d)[:c] * 3
    tr_y = torch.arange(c).repeat_interleave(per)
    te_y = torch.arange(c).repeat_interleave(7)
    tr = basis[tr_y] + 0.1 * torch.randn(len(tr_y), d, generator=g)
    te = basis[te_y] + 0.1 * torch.randn(len(te_y), d, generator=g)
    accs = knn_accuracy(tr, tr_y, te, te_y, ks=[1, 5, 20])
    assert accs == {1: 100.0, 5: 100.0, 20: 100.0}
    # shuffled labels: far from perfect
    wrong = knn_accuracy(tr, (tr_y + 1) % c, te, te_y, ks=[1])
    assert wrong[1] == 0.0


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def _knn_by_hand(train, labels, query, k, temp, n_classes):
    sims = []
    for f, y in zip(train, labels):
        nf = math.sqrt(sum(v * v for v in f))
        nq = math.sqrt(sum(v * v for v in query))
        sims.append((sum(a * b for a, b in zip(f, query)) / (nf * nq), y))
    sims.sort(key=lambda s: -s[0])
    votes = [0.0] * n_classes
    for s, y in sims[:k]:
        votes[y] += math.exp(s / temp)
    return max(range(n_classes), key=lambda c: votes[c])


def test_knn_k1_vs_k3_hand_derived():
    # train points on the unit circle (scaled arbitrarily: features are normalised)
    train = [_unit(0.1), [2 * v for v in _unit(0.2)], _unit(0.3), _unit(2.5)]
    labels = [0, 1, 1, 0]
    query = _unit(0.0)
    tr, y, q = torch.tensor(train), torch.tensor(labels), torch.tensor([query])
    # T = 0.07: the 2 votes for class 1 (exp(cos .2/T) + exp(cos .3/T)) beat exp(cos .1/T)
    assert math.exp(math.cos(0.2) / 0.07) + math.exp(math.cos(0.3) / 0.07) > math.exp(math.cos(0.1) / 0.07)
    preds = knn_classify(tr, y, q, ks=[1, 3], temperature=0.07)
    assert preds[1].tolist() == [0] == [_knn_by_hand(train, labels, query, 1, 0.07, 2)]
    assert preds[3].tolist() == [1] == [_knn_by_hand(train, labels, query, 3, 0.07, 2)]
    # T = 0.005: the weights are sharp enough that the single nearest neighbour wins with k = 3
    assert math.exp(math.cos(0.2) / 0.005) + math.exp(math.cos(0.3) / 0.005) < math.exp(math.cos(0.1) / 0.005)
    preds = knn_classify(tr, y, q, ks=[3], temperature=0.005)
    assert preds[3].tolist() == [0] == [_knn_by_hand(train, labels, query, 3, 0.005, 2)]
    # k larger than the bank: all 4 vote
    preds = knn_classify(tr, y, q, ks=[10], temperature=0.07)
    assert preds[10].tolist() == [_knn_by_hand(train, labels, query, 4, 0.07, 2)]


def test_knn_random_against_brute_force():
    g = torch.Generator().manual_seed(3)
    tr = torch.randn(30, 4, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    te = torch.randn(9, 4, generator=g)
    preds = knn_classify(tr, y, te, ks=[1, 5, 12], temperature=0.1, chunk=4)
    for k in (1, 5, 12):
        for i in range(9):
            assert preds[k][i].item() == _knn_by_hand(tr.tolist(), y.tolist(), te[i].tolist(), k, 0.1, 3)


def test_knn_accuracy_excludes_unlabelled():
    tr = torch.tensor([_unit(0.0), _unit(0.05), _unit(1.6), _unit(1.65)])
    tr_y = torch.tensor([0, 0, 1, 1])
    # an unlabelled train point sitting exactly on each test point would win if it voted
    tr = torch.cat([tr, torch.tensor([_unit(0.02), _unit(1.62)])])
    tr_y = torch.cat([tr_y, torch.tensor([-1, -1])])
    te = torch.tensor([_unit(0.02), _unit(1.62), _unit(0.01)])
    te_y = torch.tensor([0, 1, -1])  # the unlabelled test sample must not count (it could never be right)
    accs = knn_accuracy(tr, tr_y, te, te_y, ks=[1, 3])
    assert accs == {1: 100.0, 3: 100.0}
    with pytest.raises(ValueError):
        knn_accuracy(tr, torch.full((6,), -1), te, te_y, ks=[1])


# --------------------------------------------------------------------------- feature pooling

def test_feature_bank_kinds():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(3, 6, generator=g) * 4
    patches = torch.randn(3, 5, 6, generator=g)
    bank = FeatureBank(cls=cls[:, None], mean_patch=patches.mean(1), registers=patches[:, :0],
                       labels=torch.zeros(3, dtype=torch.long))
    assert torch.equal(bank.get("cls"), cls)
    mean = bank.get("mean_patch")
    both = bank.get("both")
    assert tuple(mean.shape) == (3, 6) and tuple(both.shape) == (3, 12)
    for b in range(3):
        m = [sum(patches[b, t, d].item() for t in range(5)) / 5 for d in range(6)]
        assert mean[b].tolist() == pytest.approx(m, abs=1e-6)
        nc = math.sqrt(sum(v * v for v in cls[b].tolist()))
        nm = math.sqrt(sum(v * v for v in m))
        assert both[b, :6].tolist() == pytest.approx([v / nc for v in cls[b].tolist()], abs=1e-6)
        assert both[b, 6:].tolist() == pytest.approx([v / nm for v in m], abs=1e-6)
    with pytest.raises(ValueError):
        bank.get("gem")
    with pytest.raises(ValueError, match="register"):
        bank.get("registers")


# --------------------------------------------------------------------------- config

def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "'lr'" in msg


@pytest.mark.parametrize("override,key", [("optim.lr=abc", "optim.lr"), ("data.batch_size=1.5", "data.batch_size"),
                                          ("train.progress=maybe", "train.progress"),
                                          ("model.patch_size=[1, 2]", "model.patch_size"),
                                          ("optim.betas=0.9", "optim.betas")])
def test_bad_type_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optimm.lr=1"])
    assert "optimm" in str(e.value) and "'optim'" in str(e.value)


def test_yaml_with_misspelt_nested_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {arch: vit_tiny}\noptim:\n  lr: 1.0e-3\n  warmup_epoch: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "optim.warmup_epoch" in str(e.value) and "'warmup_epochs'" in str(e.value)
    p.write_text("data:\n  train: {kind: fmnist, splt: test}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "data.train.splt" in str(e.value)


def test_missing_config_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError):
        load_config("no_such_preset_name")


def test_every_preset_loads():
    names = preset_names()
    assert names  # at least one shipped preset
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.crops.global_size % cfg.model.patch_size == 0


@pytest.mark.parametrize("source", ["default", "preset"])
def test_dump_yaml_round_trip(tmp_path, source):
    overrides = ["optim.lr=3e-4", "crops.n_local=3", "data.eval_test.kind=fmnist", "eval.knn.ks=[5,7]",
                 "description='a run: with colon'", "train.progress=false"]
    base = preset_names()[0] if source == "preset" else None
    cfg = load_config(base, overrides)
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_yaml(cfg))
    back = load_config(str(p))
    assert back == cfg
    assert back.optim.lr == 3e-4 and back.eval.knn.ks == [5, 7] and back.train.progress is False
    # a dump with no name gets the file stem, like any YAML file without a name
    d = dataclasses.asdict(cfg)
    d.pop("name")
    import yaml
    q = tmp_path / "stem_name.yaml"
    q.write_text(yaml.safe_dump(d))
    assert load_config(str(q)).name == "stem_name"


def test_numeric_string_override_parsed_as_float():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.min_lr=2E-7", "optim.epochs=3"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 0.001
    assert cfg.optim.min_lr == 2e-7
    assert isinstance(cfg.optim.epochs, float) and cfg.optim.epochs == 3.0


def test_yaml_numeric_string_parsed_as_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 5e-4, min_lr: 1e-6}\n")  # YAML 1.1 reads these as strings
    cfg = load_config(str(p))
    assert cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-6


@pytest.mark.parametrize("override", ["crops.global_size=18", "crops.local_size=10", "model.img_size=30"])
def test_crop_sizes_must_be_multiples_of_patch(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.patch_size=4", "model.img_size=16", "crops.global_size=16", "crops.local_size=8",
                           override])
    assert override.split("=")[0] in str(e.value)


def test_numeric_looking_string_field_round_trips(tmp_path):
    cfg = load_config(None, [])
    cfg.name = "42"
    cfg.output_dir = "1e3"
    p = tmp_path / "r.yaml"
    p.write_text(dump_yaml(cfg))
    back = load_config(str(p))
    assert back.name == "42" and back.output_dir == "1e3"


def test_quoted_string_override_kept_verbatim():
    cfg = load_config(None, ["name='007'", "output_dir=\"runs/1\""])
    assert cfg.output_dir == "runs/1"
    assert cfg.name == "007"


# --------------------------------------------------------------------------- checkpoints / RNG

def test_save_atomic_and_load(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "nested": {"a": [1, 2.5, "x"]}, "rng": rng_state()}
    path = tmp_path / "ck" / "last.pt"
    save_atomic(obj, path)
    save_atomic({"w": obj["w"] * 2, "step": 8}, path)  # overwrite in place
    assert sorted(x.name for x in path.parent.iterdir()) == ["last.pt"]  # no temp file left over
    back = load_checkpoint(path)
    assert back["step"] == 8 and torch.equal(back["w"], torch.arange(6.0).reshape(2, 3) * 2)
    save_atomic(obj, path)
    back = load_checkpoint(path)
    assert back["nested"] == {"a": [1, 2.5, "x"]} and torch.equal(back["w"], obj["w"])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(123)
    np.random.seed(456)
    random.seed(789)
    np.random.randn(3)  # leave a cached gaussian / advanced positions
    random.gauss(0, 1)
    state = rng_state()
    save_atomic({"rng": state}, tmp_path / "r.pt")

    def draw():
        return (torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)],
                np.random.randn(2).tolist(), random.gauss(0, 1))

    first = draw()
    draw()  # move everything on
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert draw() == first
    set_rng_state(state)
    assert draw() == first


# --------------------------------------------------------------------------- augmentation / sampler

def _crops_cfg(**kw) -> CropsConfig:
    return CropsConfig(global_size=16, local_size=8, n_local=2, **kw)


def test_multicrop_deterministic_and_shapes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    mc = MultiCrop(_crops_cfg())
    a, b, c = mc(img, 11), mc(img, 11), mc(img, 12)
    assert mc.n_crops == 4 and len(a) == 4
    for i, t in enumerate(a):
        s = 16 if i < 2 else 8
        assert t.dtype == torch.uint8 and tuple(t.shape) == (3, s, s)
        assert torch.equal(t, b[i])
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[2], a[3])  # the two local crops are different draws
    # determinism does not depend on what ran before
    mc2 = MultiCrop(_crops_cfg())
    mc2(img, 5)
    assert all(torch.equal(x, y) for x, y in zip(mc2(img, 11), a))


def test_effective_blur_p():
    assert _crops_cfg().effective_blur_p() == [1.0, 0.1, 0.5]
    assert _crops_cfg(dinov2_inverted_blur=True).effective_blur_p() == pytest.approx([0.0, 0.9, 0.5])


def _batches(n, b, rank, world, seed, epoch, start=0):
    return list(EpochBatchSampler(n, b, rank, world, seed, epoch, start))


def test_epoch_batch_sampler_ranks_union_equals_single_process():
    n, b = 103, 4
    single = _batches(n, 2 * b, 0, 1, seed=3, epoch=2)
    r0, r1 = _batches(n, b, 0, 2, 3, 2), _batches(n, b, 1, 2, 3, 2)
    assert len(single) == len(r0) == len(r1) == 103 // 8 == EpochBatchSampler.steps_per_epoch(n, b, 2)
    for s in range(len(single)):
        assert len(r0[s]) == len(r1[s]) == b
        assert set(r0[s]) | set(r1[s]) == set(single[s])
        assert r0[s] + r1[s] == single[s]
    assert all(e == 2 for batch in single for e, _ in batch)


def test_epoch_batch_sampler_resume_and_uniqueness():
    n, b = 50, 3
    full = _batches(n, b, 0, 1, 0, 1)
    assert len(full) == 16
    for s in (0, 5, 15, 16):
        tail = _batches(n, b, 0, 1, 0, 1, start=s)
        assert tail == full[s:]
        assert len(EpochBatchSampler(n, b, 0, 1, 0, 1, s)) == len(full) - s
    idx = [i for batch in full for _, i in batch]
    assert len(idx) == len(set(idx)) == 48 and all(0 <= i < n for i in idx)
    # different epoch -> different order
    assert _batches(n, b, 0, 1, 0, 2) != full
    # across ranks too: no index is used twice within an epoch
    both = [i for r in range(2) for batch in _batches(n, b, r, 2, 0, 1) for _, i in batch]
    assert len(both) == len(set(both)) == 48


# --------------------------------------------------------------------------- hub

def test_export_then_load_backbone(tmp_path):
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(arch="vit_tiny", depth=2, embed_dim=48, num_heads=3, patch_size=4, img_size=16,
                                    num_register_tokens=1, layerscale_init=1e-5))
    with torch.no_grad():
        m.mask_token.normal_()
    m.eval()
    path = export_backbone(m, tmp_path / "exp", extra={"crops": {"global_size": 16}})
    assert path.name == "backbone.safetensors"
    for src in (path, tmp_path / "exp"):
        loaded, meta = load_backbone(src)
        assert meta["crops"] == {"global_size": 16} and meta["model"]["num_register_tokens"] == 1
        sd_a, sd_b = m.state_dict(), loaded.state_dict()
        assert sd_a.keys() == sd_b.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
        assert not loaded.training
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(m.forward_features(x).patches,
                               loaded.forward_features(x).patches)
            assert torch.equal(m(x), loaded(x))
