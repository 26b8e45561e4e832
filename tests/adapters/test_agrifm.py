"""AgriFM adapter: parity with the vendored AgriFM Video-Swin, key mapping, preprocessing."""

from __future__ import annotations

import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from adapters import agrifm
from adapters.agrifm import (AGRIFM_S2_MEAN, AGRIFM_S2_STD, S2_BANDS, AgriFMAdapter, AgriFMConfig, AgriFMEncoder)
from adapters.base import AdapterError, CheckpointError, load_strict
from adapters.checkpoints import randomize_parameters, save_atomic
from conftest import load_rs_embed_vendor

# Reduced architecture for fast parity: same window (8,7,7), so the 64 px / T=8 input clamps the
# window depth (D=2) in every stage and the spatial window in the last (4×4), pads 32/16/8 to
# multiples of 7, shifts in stages 0-2 and averages a zero-padded lone frame in the second merge.
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))


# --- reference (vendored upstream file behind minimal OpenMMLab stand-ins) ----------------------
class _Registry:
    """Stand-in for an mmengine registry: ``register_module()`` decorator and ``build(cfg)``."""

    def __init__(self) -> None:
        self.classes: dict[str, type] = {}

    def register_module(self, module=None, name=None, force=False):
        def add(cls):
            self.classes[name or cls.__name__] = cls
            return cls

        return add(module) if module is not None else add

    def build(self, cfg):
        cfg = dict(cfg)
        return self.classes[cfg.pop("type")](**cfg)


class _BaseModel(nn.Module):
    def __init__(self, data_preprocessor=None, init_cfg=None):
        super().__init__()


def _openmmlab_stubs() -> dict[str, types.ModuleType]:
    registry = _Registry()  # one registry: MODELS.build must find BACKBONES-registered classes
    mods = {name: types.ModuleType(name) for name in (
        "mmseg", "mmseg.models", "mmseg.models.builder", "mmseg.registry", "mmseg.registry.registry",
        "mmengine", "mmengine.model", "mmengine.runner")}
    mods["mmseg.models.builder"].BACKBONES = registry
    mods["mmseg.registry.registry"].MODELS = registry
    mods["mmseg.registry.registry"].TRANSFORMS = _Registry()
    mods["mmengine.model"].BaseModule = nn.Module
    mods["mmengine.model"].BaseModel = _BaseModel

    def load_checkpoint(*args, **kwargs):
        raise AssertionError("the parity test loads reference weights itself")

    mods["mmengine.runner"].load_checkpoint = load_checkpoint
    return mods


@pytest.fixture(scope="module")
def ref_module():
    """The vendored upstream module, imported with stub mmseg/mmengine that are removed afterwards."""
    stubs = _openmmlab_stubs()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers deprecation
            mod = load_rs_embed_vendor("agrifm_video_swin_transformer")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return mod


def build_reference(mod, cfg: AgriFMConfig) -> nn.Module:
    """The S2 encoder exactly as rs-embed builds it (configs/cropland_mapping.py), optionally reduced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.meshgrid without indexing= (ij, as we rebuild it)
        model = _build_reference(mod, cfg)
    return randomize_parameters(model, seed=3).eval()


def _build_reference(mod, cfg: AgriFMConfig) -> nn.Module:
    return mod.PretrainingSwinTransformer3DEncoder(
        patch_emd_cfg=dict(type="SwinPatchEmbed3D", patch_size=(4, 2, 2), in_chans=10, embed_dim=cfg.embed_dim),
        backbone_cfg=dict(type="SwinTransformer3D", pretrained=None, pretrained2d=False, patch_size=(4, 2, 2),
                          embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                          window_size=cfg.window_size, out_indices=(0, 1, 2, 3), mlp_ratio=4.0, qkv_bias=True,
                          qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, patch_norm=False,
                          frozen_stages=-1, use_checkpoint=False, downsample_steps=((2, 2, 2),) * 4,
                          feature_fusion="cat", mean_frame_down=True),
        init_cfg=None)


def published_file(ref: nn.Module, path, *, ddp_prefix: bool = False, extra: dict | None = None,
                   drop: tuple[str, ...] = ()):
    """Write the reference weights the way AgriFM.pth stores them (written by hand, not by the adapter)."""
    sd = {}
    for key, value in ref.state_dict().items():
        if key.startswith("patch_emd."):
            key = "S2_patch_emd." + key[len("patch_emd."):]
        sd[("module." if ddp_prefix else "") + key] = value.clone()
    torch.manual_seed(1)
    sd["HLSL30_patch_emd.proj.weight"] = torch.randn(128, 6, 4, 2, 2)
    sd["HLSL30_patch_emd.proj.bias"] = torch.randn(128)
    sd["Modis_patch_emd.proj.weight"] = torch.randn(128, 7, 4, 2, 2)
    sd["Modis_patch_emd.proj.bias"] = torch.randn(128)
    sd.update(extra or {})
    for key in drop:
        sd.pop(key)
    return save_atomic({"meta": {"mmengine_version": "0.10.7", "epoch": 100}, "state_dict": sd}, path)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def small(ref_module, tmp_path_factory):
    cfg = AgriFMConfig(**SMALL)
    ref = build_reference(ref_module, cfg)
    path = published_file(ref, tmp_path_factory.mktemp("agrifm") / "AgriFM.pth", ddp_prefix=True)
    return cfg, ref, path


# --- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,px", [(8, 64), (12, 56)])
def test_parity_reduced(small, frames, px):
    """T=8 / 64 px: attention padding (32, 16, 8 -> multiples of 7), shifted windows, D clamped to 2, spatial
    window clamped to 4×4 in the last stage, a lone frame zero-padded and averaged in the second merge.
    T=12 / 56 px adds D=3 (clamped window of depth 3, zero-padded to 4 in the first merge), a feature side equal
    to the window (7: clamped, no shift) and an odd side (7) zero-padded in PatchMerging."""
    cfg, ref, path = small
    cfg = AgriFMConfig(**{**SMALL, "frames": frames, "image_size": px})
    adapter = AgriFMAdapter.from_checkpoint(path, config=cfg)
    x = torch.randn(2, frames, 10, px, px, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        want = ref(x)["encoder_features"]
        got = adapter.embed(x)
        got_max = adapter.embed(x, pooling="max")
    assert got.grid.shape == want.shape
    assert want.abs().mean() > 0.1  # non-trivial output
    diff = _max_abs(got.grid, want)
    print(f"AgriFM reduced parity T={frames} {px}px: grid {tuple(want.shape)} max|diff| {diff:.2e}")
    assert diff < 1e-4
    assert _max_abs(got.pooled, want.mean(dim=(2, 3))) < 1e-5
    assert _max_abs(got_max.pooled, want.amax(dim=(2, 3))) < 1e-4


def test_parity_detects_a_wrong_merge_order(small):
    """The parity check must be sensitive: swapping x1/x2 in PatchMerging breaks it."""
    cfg, ref, path = small
    adapter = AgriFMAdapter.from_checkpoint(path, config=cfg)
    merge = adapter.model.backbone.layers[0].downsample
    with torch.no_grad():
        w = merge.reduction.weight.view(-1, 4, cfg.embed_dim)
        w[:, [1, 2]] = w[:, [2, 1]].clone()
        merge.norm.weight.view(4, -1)[[1, 2]] = merge.norm.weight.view(4, -1)[[2, 1]].clone()
        merge.norm.bias.view(4, -1)[[1, 2]] = merge.norm.bias.view(4, -1)[[2, 1]].clone()
    x = torch.randn(1, 8, 10, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _max_abs(adapter.model(x), ref(x)["encoder_features"]) > 1e-2


@pytest.mark.slow
def test_full_size_parity_and_shapes(ref_module, tmp_path):
    """Published architecture, B=1, T=8, 224 px: shapes, 24 index buffers and parity."""
    cfg = AgriFMConfig()
    ref = build_reference(ref_module, cfg)
    model = AgriFMEncoder(cfg)
    sd = {k.replace("patch_emd.", "S2_patch_emd.", 1) if k.startswith("patch_emd.") else k: v
          for k, v in ref.state_dict().items()}
    load_strict(model, AgriFMAdapter.checkpoint_filter_fn({"state_dict": sd}, model), source="reference")
    adapter = AgriFMAdapter(model, cfg)
    n_index = sum(k.endswith("relative_position_index") for k in model.state_dict())
    assert n_index == 24 and len(model.state_dict()) == 349
    assert sum(p.numel() for p in model.parameters()) == 87_646_920
    x = torch.randn(1, 8, 10, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = adapter.embed(x)
        elapsed = time.perf_counter() - t0
        want = ref(x)["encoder_features"]
    assert out.grid.shape == (1, 1024, 14, 14) and out.pooled.shape == (1, 1024)
    diff = _max_abs(out.grid, want)
    print(f"AgriFM full-size parity: max|diff| grid {diff:.2e}, pooled "
          f"{_max_abs(out.pooled, want.mean(dim=(2, 3))):.2e}; adapter forward {elapsed:.2f} s")
    assert diff < 1e-4


# --- checkpoint key mapping ------------------------------------------------------------------------
def test_filter_renames_s2_and_drops_other_sensors(small):
    cfg, ref, path = small
    model = AgriFMEncoder(cfg)
    raw = torch.load(path, weights_only=True)
    assert any(k.startswith("module.S2_patch_emd.") for k in raw["state_dict"])
    sd = AgriFMAdapter.checkpoint_filter_fn(raw, model)
    assert set(sd) == set(model.state_dict())
    assert torch.equal(sd["patch_emd.proj.weight"], ref.state_dict()["patch_emd.proj.weight"])
    assert not any(k.startswith(("HLSL30", "Modis", "S2_", "module.")) for k in sd)
    # the same weights wrapped as 'model' or bare load too
    assert set(AgriFMAdapter.checkpoint_filter_fn({"model": raw["state_dict"]}, model)) == set(sd)
    assert set(AgriFMAdapter.checkpoint_filter_fn(dict(raw["state_dict"]), model)) == set(sd)


def test_unknown_extra_key_fails(small, tmp_path):
    cfg, ref, _ = small
    path = published_file(ref, tmp_path / "extra.pth", extra={"mask_token": torch.zeros(1, 1, 128)})
    with pytest.raises(CheckpointError, match="unexpected keys.*mask_token"):
        AgriFMAdapter.from_checkpoint(path, config=cfg)


def test_missing_key_is_named(small, tmp_path):
    cfg, ref, _ = small
    key = "backbone.layers.2.blocks.1.mlp.fc2.weight"
    path = published_file(ref, tmp_path / "missing.pth", drop=(key,))
    with pytest.raises(CheckpointError, match=f"missing keys.*{key}"):
        AgriFMAdapter.from_checkpoint(path, config=cfg)


def test_wrong_architecture_fails(small):
    _, _, path = small
    with pytest.raises(CheckpointError, match="shape mismatches|missing keys"):
        AgriFMAdapter.from_checkpoint(path, config=AgriFMConfig(embed_dim=48, depths=(2, 2, 2, 2),
                                                                num_heads=(2, 2, 4, 4)))


def test_relative_position_index_rules(small):
    cfg, ref, _ = small
    model = AgriFMEncoder(cfg)
    sd = dict(ref.state_dict())
    key = "backbone.layers.1.blocks.0.attn.relative_position_index"
    bad = dict(sd)
    bad[key] = sd[key].flip(0)
    with pytest.raises(CheckpointError, match="relative_position_index.*differs"):
        AgriFMAdapter.checkpoint_filter_fn({"state_dict": bad}, model)
    partial = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match="23 of 24|missing"):
        AgriFMAdapter.checkpoint_filter_fn({"state_dict": partial}, model)
    none = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}
    rebuilt = AgriFMAdapter.checkpoint_filter_fn({"state_dict": none}, model)
    assert torch.equal(rebuilt[key], sd[key])
    # the upstream index and ours agree for the full window
    assert torch.equal(agrifm.relative_position_index((8, 7, 7)), sd[key])


def test_truncated_file_fails(small, tmp_path):
    cfg, _, path = small
    blob = path.read_bytes()
    cut = tmp_path / "AgriFM.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        AgriFMAdapter.from_checkpoint(cut, config=cfg)


def test_published_state_dict_round_trip(tmp_path):
    cfg = AgriFMConfig(**SMALL)
    path = AgriFMAdapter.write_random_checkpoint(tmp_path / "AgriFM.pth", config=cfg, seed=7)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"meta", "state_dict"}
    sd = raw["state_dict"]
    assert sd["HLSL30_patch_emd.proj.weight"].shape == (cfg.embed_dim, 6, 4, 2, 2)
    assert sd["Modis_patch_emd.proj.weight"].shape == (cfg.embed_dim, 7, 4, 2, 2)
    assert "S2_patch_emd.proj.weight" in sd and not any(k.startswith("patch_emd.") for k in sd)
    adapter = AgriFMAdapter.from_checkpoint(path, config=cfg)
    assert torch.equal(adapter.model.patch_emd.proj.weight, sd["S2_patch_emd.proj.weight"])


# --- preprocessing / inputs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter():
    cfg = AgriFMConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), image_size=32)
    return AgriFMAdapter(randomize_parameters(AgriFMEncoder(cfg)), cfg)


def _raw(shape, seed=0):
    return np.random.default_rng(seed).uniform(-500, 12000, size=shape).astype(np.float32)


def test_preprocess_agrifm_stats_by_hand(tiny_adapter):
    raw = _raw((2, 8, 10, 32, 32))
    raw[0, 0, 0, 0, 0] = np.nan
    x = tiny_adapter.preprocess(raw, bands=S2_BANDS).numpy()
    clipped = np.clip(np.nan_to_num(raw.astype(np.float64)), 0, 10000)
    want = (clipped - np.array(AGRIFM_S2_MEAN)[:, None, None]) / np.array(AGRIFM_S2_STD)[:, None, None]
    assert x.shape == (2, 8, 10, 32, 32)
    np.testing.assert_allclose(x, want, atol=1e-5)
    # spot values: B2 at 0 and B12 at 10000
    assert x[0, 0, 0, 0, 0] == pytest.approx(-4179.192015478227 / 4041.5212325268735, abs=1e-6)


def test_preprocess_modes_and_resize(monkeypatch):
    raw = _raw((1, 8, 10, 16, 16), seed=1)
    monkeypatch.setenv("RS_EMBED_AGRIFM_NORM", "unit_scale")
    monkeypatch.setenv("RS_EMBED_AGRIFM_IMG", "32")
    cfg = AgriFMConfig.from_env()
    assert (cfg.norm, cfg.image_size, cfg.frames) == ("unit_scale", 32, 8)
    ad = AgriFMAdapter(AgriFMEncoder(AgriFMConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))), cfg)
    x = ad.preprocess(raw)
    unit = torch.from_numpy(np.clip(raw, 0, 10000) / 10000.0).reshape(8, 10, 16, 16)
    want = torch.nn.functional.interpolate(unit, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(x[0], want, atol=1e-6)
    ad.config = AgriFMConfig(norm="none", image_size=16)
    np.testing.assert_allclose(ad.preprocess(raw).numpy(), np.clip(raw, 0, 10000))
    # normalisation happens before the resize (bilinear is affine, so z-scoring first == after here,
    # but the reflect pad of a non-square chip must see normalised values too)
    ad.config = AgriFMConfig(image_size=20)
    rect = _raw((1, 8, 10, 12, 20), seed=2)
    z = (np.clip(rect, 0, 10000) - np.array(AGRIFM_S2_MEAN, np.float32)[:, None, None]) / \
        np.array(AGRIFM_S2_STD, np.float32)[:, None, None]
    padded = np.pad(z, [(0, 0)] * 3 + [(4, 4), (0, 0)], mode="reflect")
    np.testing.assert_allclose(ad.preprocess(rect).numpy(), padded, atol=1e-5)


def test_config_validation(monkeypatch):
    with pytest.raises(AdapterError, match="RS_EMBED_AGRIFM_NORM"):
        AgriFMConfig(norm="minmax")
    assert AgriFMConfig(norm="zscore").norm == "agrifm_stats"
    monkeypatch.setenv("RS_EMBED_AGRIFM_FRAMES", "eight")
    with pytest.raises(AdapterError, match="RS_EMBED_AGRIFM_FRAMES"):
        AgriFMConfig.from_env()
    with pytest.raises(AdapterError, match="RS_EMBED_AGRIFM_FRAMES"):
        AgriFMConfig(frames=0)
    with pytest.raises(AdapterError, match="divisible"):
        AgriFMConfig(embed_dim=100, num_heads=(3, 8, 16, 32))


def test_input_errors(tiny_adapter):
    with pytest.raises(AdapterError, match="8 frames"):
        tiny_adapter.preprocess(_raw((1, 6, 10, 32, 32)))
    with pytest.raises(AdapterError, match="10 channels"):
        tiny_adapter.preprocess(_raw((1, 8, 12, 32, 32)))
    with pytest.raises(AdapterError, match=r"\(B, T, C, H, W\)"):
        tiny_adapter.preprocess(_raw((8, 10, 32, 32)))
    with pytest.raises(AdapterError, match="order"):
        tiny_adapter.preprocess(_raw((1, 8, 10, 32, 32)), bands=tuple(reversed(S2_BANDS)))
    with pytest.raises(AdapterError, match="frames"):
        tiny_adapter.embed(torch.zeros(1, 4, 10, 32, 32))


def test_spec_and_embed_raw(tiny_adapter):
    spec = AgriFMAdapter.spec
    assert (spec.frames, spec.chip_size, spec.image_size, spec.embed_dim, spec.grid_size) == (8, 224, 224, 1024, 14)
    assert spec.sensor == "s2" and spec.bands == S2_BANDS and spec.checkpoint.file_format == "mmengine"
    assert spec.checkpoint.env_prefix == "RS_EMBED_AGRIFM" and spec.checkpoint.filename == "AgriFM.pth"
    assert spec.grid_resolution_m == 160.0
    out = tiny_adapter.embed_raw(_raw((2, 8, 10, 32, 32)), bands=S2_BANDS)
    assert out.pooled.shape == (2, 128) and out.grid.shape == (2, 128, 2, 2)
    h = tiny_adapter.preprocessing_hash()
    assert h == AgriFMAdapter(tiny_adapter.model, tiny_adapter.config).preprocessing_hash()
    other = AgriFMAdapter(tiny_adapter.model, AgriFMConfig(**{**tiny_adapter.config.__dict__, "norm": "unit_scale"}))
    assert other.preprocessing_hash() != h
