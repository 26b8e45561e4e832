"""ScaleMAE ViT-L/16 adapter (scalemae_rgb): parity with rshf's ScaleMAE backbone, the GSD-scaled
position embedding, strict loading of the published ``model.``-prefixed layout and rs-embed's
RGB preprocessing."""

from __future__ import annotations

import time
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import adapters
from conftest import assert_close
from adapters.base import AdapterError, CheckpointError, load_strict
from adapters.checkpoints import randomize_parameters, resolve_checkpoint
from adapters.scalemae import (IMAGENET_MEAN, IMAGENET_STD, RGB_BANDS, ScaleMAEAdapter, ScaleMAEConfig, ScaleMAEViT,
                               gsd_sincos_pos_embed)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import rshf.scalemae.model as rshf_scalemae  # imported directly: the rshf package pulls optional extras

SMALL = dict(embed_dim=64, depth=2, num_heads=4, image_size=64)


def small_config(**kw) -> ScaleMAEConfig:
    return ScaleMAEConfig(**{**SMALL, **kw})


class Wrapper(nn.Module):
    """Stands in for ``rshf.scalemae.ScaleMAE`` (the backbone at ``.model``) without a hub download."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.model = backbone


def reference_wrapper(cfg: ScaleMAEConfig, *, seed: int = 0) -> nn.Module:
    """rshf's ScaleMAE backbone class (same constructor call as ``vit_large_patch16``, smaller sizes)."""
    backbone = rshf_scalemae.VisionTransformer(
        cls_token_flag=True, global_pool=False, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=1000,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return randomize_parameters(Wrapper(backbone), seed=seed).eval()


def reference_tokens(wrapper: nn.Module, x: torch.Tensor, res) -> torch.Tensor:
    """What rs-embed runs: ``wrapper.model.forward_features(x, input_res=tensor([gsd, ...]))``."""
    with torch.no_grad():
        return wrapper.model.forward_features(x, input_res=torch.as_tensor(res, dtype=torch.float32).reshape(-1))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    cfg = small_config()
    ref = reference_wrapper(cfg)
    path = tmp_path_factory.mktemp("scalemae") / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    return cfg, ref, path


# --- position embedding ------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(1024, 14), (64, 4), (32, 7)])
def test_pos_embed_matches_rshf_exactly(dim, grid):
    res = torch.tensor([10.0, 18.303571, 0.5])
    ours = gsd_sincos_pos_embed(dim, grid, res)
    ref = rshf_scalemae.get_2d_sincos_pos_embed_with_resolution(dim, grid, res, cls_token=True)
    assert ours.dtype == torch.float32 and ours.shape == (3, 1 + grid * grid, dim)
    assert torch.equal(ours, ref)


def test_pos_embed_layout_by_hand():
    dim, g = 8, 3
    emb = gsd_sincos_pos_embed(dim, g, torch.tensor([2.0]))[0]
    assert torch.equal(emb[0], torch.zeros(dim))  # CLS slot
    omega = torch.tensor([1.0, 1.0 / 100.0])  # 10000^(-i/2), i = 0, 1
    # token 1 + r*g + c: first half encodes the column c*res, second half the row r*res
    r, c = 1, 2
    col, row = c * 2.0 * omega, r * 2.0 * omega
    expected = torch.cat([torch.sin(col), torch.cos(col), torch.sin(row), torch.cos(row)])
    torch.testing.assert_close(emb[1 + r * g + c], expected)


# --- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [10.0, [7.5, 30.0]])
def test_parity_with_rshf_small(small_ckpt, res):
    cfg, ref, path = small_ckpt
    ad = ScaleMAEAdapter.from_checkpoint(path, config=cfg)
    x = torch.randn(2, 3, 64, 64)
    tokens = reference_tokens(ref, x, res if isinstance(res, list) else [res])
    mean = ad.embed(x, input_res_m=res)
    mx = ad.embed(x, pooling="max", input_res_m=res)
    assert mean.pooled.shape == (2, 64) and mean.grid.shape == (2, 64, 4, 4)
    assert_close(mean.pooled, tokens[:, 1:].mean(1))
    assert_close(mx.pooled, tokens[:, 1:].amax(1))
    assert_close(mean.grid, tokens[:, 1:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2))
    # the GSD matters: another resolution gives other tokens
    other = ad.embed(x, input_res_m=40.0)
    assert (other.pooled - mean.pooled).abs().max() > 1e-3


def test_default_input_res_is_10m_per_chip(small_ckpt):
    cfg, ref, path = small_ckpt
    ad = ScaleMAEAdapter.from_checkpoint(path, config=cfg)
    x = torch.randn(1, 3, 64, 64)
    # chip 224 px of the 10 m grid shown at 64 px -> 35 m
    assert ad.default_input_res_m() == pytest.approx(10.0 * 224 / 64)
    out = ad.embed(x)
    tokens = reference_tokens(ref, x, [10.0 * 224 / 64])
    assert_close(out.pooled, tokens[:, 1:].mean(1))
    assert ScaleMAEAdapter(ScaleMAEAdapter.build_model(ScaleMAEConfig(depth=0)), ScaleMAEConfig(depth=0)
                           ).default_input_res_m() == 10.0


def test_forward_kwargs_true_ground_resolution(small_ckpt):
    cfg, _, path = small_ckpt
    ad = ScaleMAEAdapter.from_checkpoint(path, config=cfg)
    assert ad.forward_kwargs((4, 3, 64, 64), pixel_size_m=10.0) == {"input_res_m": 10.0}
    assert ad.forward_kwargs((4, 3, 224, 224), pixel_size_m=10.0)["input_res_m"] == pytest.approx(35.0)
    assert ad.forward_kwargs((1, 3, 410, 500), pixel_size_m=10.0)["input_res_m"] == pytest.approx(4100 / 64)
    for bad in (0.0, -10.0, float("nan")):
        with pytest.raises(AdapterError, match="pixel_size_m"):
            ad.forward_kwargs((1, 3, 64, 64), pixel_size_m=bad)
    with pytest.raises(AdapterError, match="input_res_m"):
        ad.embed(torch.randn(2, 3, 64, 64), input_res_m=[10.0, 20.0, 30.0])
    with pytest.raises(AdapterError, match="input_res_m"):
        ad.embed(torch.randn(1, 3, 64, 64), input_res_m=0.0)
    # embed_raw wires preprocess + forward_kwargs: a 64 px chip at 10 m -> input_res_m 10 m
    raw = np.random.default_rng(0).uniform(0, 3000, size=(1, 3, 64, 64)).astype(np.float32)
    a = ad.embed_raw(raw, bands=RGB_BANDS, pixel_size_m=10.0)
    b = ad.embed(ad.preprocess(raw), input_res_m=10.0)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_full_size_parity_and_shapes():
    """The published architecture (rshf ``ScaleMAE()``, ViT-L/16) at batch 1: layout, parity, shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # built on the meta device (skips timm's 300 M-parameter init), then given real random weights
        with torch.device("meta"):
            ref = rshf_scalemae.ScaleMAE_baseline()
        ref = randomize_parameters(ref.to_empty(device="cpu"), seed=1).eval()
    sd = ref.state_dict()
    assert len(sd) == 293 and all(k.startswith("model.") for k in sd) and "model.norm.weight" in sd
    assert sum(v.numel() for v in sd.values()) == 303_099_904
    cfg = ScaleMAEConfig()
    with torch.device("meta"):  # every weight comes from the state dict: skip the 0.1-0.3 G-parameter init
        model = ScaleMAEAdapter.build_model(cfg)
    model = model.to_empty(device="cpu")
    load_strict(model, ScaleMAEAdapter.checkpoint_filter_fn(sd, model), source="rshf ScaleMAE state dict")
    ad = ScaleMAEAdapter(model, cfg)
    raw = np.random.default_rng(1).uniform(0, 4000, size=(1, 3, 224, 224)).astype(np.float32)
    x = ad.preprocess(raw, bands=RGB_BANDS)
    kw = ad.forward_kwargs(raw.shape, pixel_size_m=10.0)
    assert kw == {"input_res_m": 10.0}
    t0 = time.perf_counter()
    out = ad.embed(x, **kw)
    elapsed = time.perf_counter() - t0
    assert out.pooled.shape == (1, 1024) and out.grid.shape == (1, 1024, 14, 14)
    tokens = reference_tokens(ref, x, [10.0])
    d_pooled = assert_close(out.pooled, tokens[:, 1:].mean(1))
    d_grid = assert_close(out.grid, tokens[:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2))
    print(f"\nScaleMAE ViT-L full size: CPU forward (batch 1) {elapsed:.2f}s; "
          f"max|Δ| pooled {d_pooled:.2e} grid {d_grid:.2e}")
    pub = ScaleMAEAdapter.published_state_dict(ad.model)
    assert list(pub) == list(sd) and all(pub[k].shape == sd[k].shape for k in sd)
    assert all(torch.equal(pub[k], sd[k]) for k in list(sd)[:3] + list(sd)[-3:])


# --- strict loading ----------------------------------------------------------------------------------
def test_every_parameter_but_the_unused_norm_changes_the_output(small_ckpt):
    cfg, _, path = small_ckpt
    ad = ScaleMAEAdapter.from_checkpoint(path, config=cfg)
    x, res = torch.randn(1, 3, 64, 64), torch.tensor([10.0])
    with torch.no_grad():
        base = ad.model.forward_tokens(x, res)
        for name, tensor in ad.model.state_dict().items():
            saved = tensor.clone()
            tensor.add_(0.5)
            changed = not torch.allclose(ad.model.forward_tokens(x, res), base, atol=1e-6)
            tensor.copy_(saved)
            if name.startswith("norm."):
                assert not changed, f"{name} must not be applied (rshf has no final norm)"
            else:
                assert changed, f"parameter {name} does not influence the output"


def test_renamed_missing_or_unprefixed_keys_fail(small_ckpt, tmp_path):
    cfg, ref, _ = small_ckpt
    sd = ref.state_dict()
    bad = dict(sd)
    bad["model.blocks.1.mlp.fc2.weights"] = bad.pop("model.blocks.1.mlp.fc2.weight")
    torch.save(bad, tmp_path / "renamed.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.weight\].*blocks\.1\.mlp\.fc2\.weights"):
        ScaleMAEAdapter.from_checkpoint(tmp_path / "renamed.bin", config=cfg)
    # the unused final norm is still required: strict means every published key is accounted for
    torch.save({k: v for k, v in sd.items() if not k.startswith("model.norm.")}, tmp_path / "nonorm.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \[norm\.bias, norm\.weight\]"):
        ScaleMAEAdapter.from_checkpoint(tmp_path / "nonorm.bin", config=cfg)
    torch.save(dict(sd, **{"model.pos_embed": torch.zeros(1, 17, 64)}), tmp_path / "pos.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[pos_embed\]"):
        ScaleMAEAdapter.from_checkpoint(tmp_path / "pos.bin", config=cfg)
    torch.save({k.removeprefix("model."): v for k, v in sd.items()}, tmp_path / "bare.bin")
    with pytest.raises(CheckpointError, match="must all start with 'model.'"):
        ScaleMAEAdapter.from_checkpoint(tmp_path / "bare.bin", config=cfg)


def test_truncated_and_foreign_checkpoints_fail(small_ckpt, tmp_path):
    cfg, _, path = small_ckpt
    blob = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        ScaleMAEAdapter.from_checkpoint(tmp_path / "cut.bin", config=cfg)
    from adapters.terrafm import TerraFMConfig, TerraFMS2Adapter
    tcfg = TerraFMConfig(embed_dim=64, depth=1, num_heads=4, pretrain_image_size=64, image_size=64)
    terrafm = TerraFMS2Adapter.write_random_checkpoint(tmp_path / "TerraFM-B.pth", config=tcfg)
    with pytest.raises(CheckpointError, match="must all start with 'model.'"):
        ScaleMAEAdapter.from_checkpoint(terrafm, config=cfg)
    # right layout, wrong size (a ViT-B-like file for the ViT-L config) -> shape mismatches
    other = ScaleMAEAdapter.write_random_checkpoint(tmp_path / "other.bin", config=small_config(embed_dim=32))
    with pytest.raises(CheckpointError, match=r"shape mismatches \[blocks\.0"):
        ScaleMAEAdapter.from_checkpoint(other, config=cfg)


# --- preprocessing ------------------------------------------------------------------------------------
def rs_embed_preprocess(raw_chw: np.ndarray, size: int) -> torch.Tensor:
    """rs-embed ``scalemae_rgb`` for input_chw: float32 /10000 clip -> ×255 astype(uint8) -> torchvision
    Resize(BICUBIC) -> ToTensor -> Normalize(ImageNet)."""
    from torchvision import transforms

    s2 = np.clip(raw_chw.astype(np.float32) / 10000.0, 0.0, 1.0)
    rgb_u8 = (s2.transpose(1, 2, 0) * 255.0).astype(np.uint8)
    tf = transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    return tf(Image.fromarray(rgb_u8, mode="RGB"))


@pytest.mark.parametrize("hw", [64, 50, 224])
def test_preprocess_matches_rs_embed(hw):
    cfg = small_config()
    ad = ScaleMAEAdapter(ScaleMAEAdapter.build_model(cfg), cfg)
    raw = np.random.default_rng(2).uniform(-200, 12000, size=(2, 3, hw, hw)).astype(np.float32)
    x = ad.preprocess(raw, bands=RGB_BANDS)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    for i in range(2):
        assert torch.equal(x[i], rs_embed_preprocess(raw[i], 64))


def test_preprocess_hand_values():
    cfg = small_config()
    ad = ScaleMAEAdapter(ScaleMAEAdapter.build_model(cfg), cfg)
    raw = np.zeros((1, 3, 64, 64), np.float32)
    raw[0, 0] = 7999.0  # 203.97 -> 203 (truncated, not rounded)
    raw[0, 1] = 12000.0  # clipped -> 255
    raw[0, 2] = np.nan  # -> 0
    x = ad.preprocess(raw)
    expect = [(203 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
              (0.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    for c in range(3):
        torch.testing.assert_close(x[0, c], torch.full((64, 64), expect[c]), rtol=1e-6, atol=1e-6)


def test_wrong_channels_and_band_order():
    cfg = small_config()
    ad = ScaleMAEAdapter(ScaleMAEAdapter.build_model(cfg), cfg)
    with pytest.raises(AdapterError, match="expects 3 channels in the order B4, B3, B2"):
        ad.preprocess(np.ones((1, 4, 64, 64), np.float32))
    with pytest.raises(AdapterError, match="order B4, B3, B2, got B2, B3, B4"):
        ad.preprocess(np.ones((1, 3, 64, 64), np.float32), bands=("B2", "B3", "B4"))
    with pytest.raises(AdapterError, match="square"):
        ad.embed(torch.randn(1, 3, 64, 48))


# --- knobs, spec, checkpoint resolution ---------------------------------------------------------------
def test_env_knobs_and_spec(monkeypatch):
    monkeypatch.setenv("RS_EMBED_SCALEMAE_IMG", "448")
    monkeypatch.setenv("RS_EMBED_SCALEMAE_BATCH_SIZE", "4")
    monkeypatch.setenv("RS_EMBED_SCALEMAE_ID", "MVRL/scalemae-vitlarge-800")
    cfg = ScaleMAEConfig.from_env()
    assert (cfg.image_size, cfg.batch_size, cfg.grid_size) == (448, 4, 28)
    for var, value, msg in [("RS_EMBED_SCALEMAE_IMG", "230", "multiple of the patch size"),
                            ("RS_EMBED_SCALEMAE_IMG", "big", "not an integer"),
                            ("RS_EMBED_SCALEMAE_BATCH_SIZE", "-2", "must be positive"),
                            ("RS_EMBED_SCALEMAE_ID", "someone/scalemae-base", "RS_EMBED_SCALEMAE_CKPT")]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(AdapterError, match=msg):
                ScaleMAEConfig.from_env()
    spec = adapters.get_spec("scalemae_rgb")
    assert adapters.get_adapter_class("scalemae_rgb") is ScaleMAEAdapter
    assert (spec.bands, spec.chip_size, spec.image_size, spec.embed_dim, spec.grid_size) == (RGB_BANDS, 224, 224,
                                                                                               1024, 14)
    assert dict(spec.default_batch_size) == {"cpu": 8, "cuda": 256}
    src = spec.checkpoint
    assert (src.hf_repo, src.filename, src.env_prefix) == (
        "MVRL/scalemae-vitlarge-800", "pytorch_model.bin", "RS_EMBED_SCALEMAE")
    assert 1.0e9 < src.min_bytes < 1.21e9
    small = ScaleMAEAdapter(ScaleMAEAdapter.build_model(small_config()), small_config())
    assert small.batch_size() == 8
    ps = small.preprocessing_spec()
    assert "not applied" in ps["final_norm"] and ps["config"]["image_size"] == 64 and "batch_size" not in ps["config"]
    big = small_config(image_size=96)
    assert ScaleMAEAdapter(ScaleMAEAdapter.build_model(big), big).preprocessing_hash() != small.preprocessing_hash()


def test_resolve_checkpoint_from_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    src = ScaleMAEAdapter.spec.checkpoint
    rev = "fedcba9876543210fedcba9876543210fedcba98"
    repo_dir = tmp_path / "hub" / "models--MVRL--scalemae-vitlarge-800"
    (repo_dir / "snapshots" / rev).mkdir(parents=True)
    (repo_dir / "snapshots" / rev / "pytorch_model.bin").write_bytes(b"\0" * 2048)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once at import
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("RS_EMBED_SCALEMAE_CKPT", raising=False)
    monkeypatch.setenv("RS_EMBED_SCALEMAE_CKPT_MIN_BYTES", "1000")
    got = resolve_checkpoint(src, model_key="scalemae_rgb", allow_download=False)
    assert got.origin == "hf_cache" and got.path.name == "pytorch_model.bin" and got.path.stat().st_size == 2048
    assert got.uri == "hf://MVRL/scalemae-vitlarge-800/pytorch_model.bin"
    monkeypatch.setenv("RS_EMBED_SCALEMAE_CKPT_MIN_BYTES", "4096")
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_checkpoint(src, model_key="scalemae_rgb", allow_download=False)
    # a local file named by RS_EMBED_SCALEMAE_CKPT wins over the cache
    local = tmp_path / "mine.bin"
    local.write_bytes(b"1")
    monkeypatch.setenv("RS_EMBED_SCALEMAE_CKPT", str(local))
    assert resolve_checkpoint(src, model_key="scalemae_rgb").origin == "local"
