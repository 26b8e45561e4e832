"""DynamicVis-B adapter: architecture facts, routing/scan order, strict mmengine loading, preprocessing, knobs."""

from __future__ import annotations

import copy
import dataclasses
import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapters.base import AdapterError, CheckpointError
from adapters.checkpoints import randomize_parameters, save_atomic
from adapters.dynamicvis import (IGNORED_PREFIXES, DynamicVisAdapter, DynamicVisBackbone, DynamicVisConfig,
                                 SpatialSparseMixer)

SMALL = DynamicVisConfig(image_size=64, num_layers=(1, 1, 2, 1))  # grids 16/8/4/2


def small_model(cfg=SMALL, seed=0):
    return randomize_parameters(DynamicVisBackbone(cfg), seed=seed, scale=0.05).eval()


def import_hf_mixer():
    try:
        import torchaudio  # noqa: F401
    except Exception:  # a torchaudio build that cannot load must not block importing transformers' Mamba
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    return MambaConfig, MambaMixer


# --- architecture --------------------------------------------------------------------------------------------
def test_published_backbone_layout():
    """311 tensors, 36,745,536 parameters, names and shapes as the published backbone (models.md §2)."""
    sd = DynamicVisBackbone(DynamicVisConfig()).state_dict()
    assert len(sd) == 311
    assert sum(v.numel() for v in sd.values()) == 36_745_536
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "pos_embed": (1, 16384, 96),
        "layers.0.0.projection.weight": (96, 3, 7, 7), "layers.0.0.norm.weight": (96,),
        "layers.1.0.projection.weight": (192, 96, 3, 3), "layers.3.0.projection.bias": (768,),
        "layers.0.1.0.spatial_gate.weight": (1, 96),
        "layers.0.1.0.spatial_mamba_mixer.pre_norm.weight": (96,),
        "layers.0.1.0.spatial_mamba_mixer.mamba_layer.A_log": (192, 16),
        "layers.0.1.0.spatial_mamba_mixer.mamba_layer.x_proj.weight": (38, 192),
        "layers.0.1.0.spatial_mamba_mixer.mamba_layer.dt_proj.weight": (192, 6),
        "layers.2.1.15.spatial_mamba_mixer.mamba_layer.in_proj.weight": (1536, 384),
        "layers.3.1.3.spatial_mamba_mixer.mamba_layer.x_proj.weight": (80, 1536),
        "layers.3.1.3.spatial_mamba_mixer.mamba_layer.conv1d.weight": (1536, 1, 4),
        "layers.3.2.weight": (768,), "layers.3.2.bias": (768,),
    }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    assert not any(k.startswith("layers.2.1.16.") for k in shapes)


def test_arch_l_layout():
    model = DynamicVisBackbone(DynamicVisConfig(arch="l", image_size=64))
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 256, 128)
    assert sd["layers.3.2.weight"].shape == (1024,)
    assert len(model.layers[2][1]) == 32
    assert sd["layers.0.1.0.spatial_mamba_mixer.mamba_layer.dt_proj.weight"].shape == (256, 8)


def test_stage_shapes_reduced():
    model = small_model()
    with torch.inference_mode():
        outs = model(torch.randn(2, 3, 64, 64), out_indices=(0, 1, 2, 3))
    assert [tuple(o.shape) for o in outs] == [(2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2)]
    with pytest.raises(AdapterError, match=r"\(B, 3, 64, 64\)"):
        model(torch.randn(1, 3, 96, 96))


def _capture_block_inputs(model):
    seen = []
    hooks = [m.spatial_mamba_mixer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for m in model.modules() if isinstance(m, SpatialSparseMixer)]
    return seen, hooks


def test_scan_sequence_is_global_rows_then_topk_descending():
    """[global tokens = row means ; selected = top N/r tokens by routing weight, highest weight first]."""
    model = small_model()
    mixer = model.layers[0][1][0]
    x = torch.randn(2, 256, 96)
    seen, hooks = _capture_block_inputs(mixer)
    with torch.inference_mode():
        mixer(x)
    for h in hooks:
        h.remove()
    seq = seen[0]
    assert seq.shape == (2, 16 + 256 // 8, 96)  # 16 global tokens (H at 64 px) + 32 selected
    assert torch.allclose(seq[:, :16], x.reshape(2, 16, 16, 96).mean(2), atol=1e-6)
    w = torch.softmax((x @ mixer.spatial_gate.weight.T).squeeze(-1), dim=1)
    order = torch.argsort(w, dim=1, descending=True)[:, :32]
    assert torch.equal(seq[:, 16:], torch.stack([x[b, order[b]] for b in range(2)]))
    w_scanned = torch.stack([w[b, order[b]] for b in range(2)])
    assert (w_scanned[:, 1:] <= w_scanned[:, :-1]).all()
    # the selected set is in descending-weight order, not raster order
    assert not torch.equal(order, order.sort(dim=1).values)


def test_scan_order_changes_the_output():
    """Scanning the same selected tokens in raster order gives a different result: the order is observable."""
    model = small_model()
    mixer = model.layers[0][1][0]
    x = torch.randn(1, 256, 96)
    with torch.inference_mode():
        ref = mixer(x)
        original = mixer.route
        mixer.route = lambda t: (lambda w, idx: (w, idx.sort(dim=1).values))(*original(t))
        raster = mixer(x)
        del mixer.route
        # what the Mamba mixer contributes at all (the same block with a zero out_proj contributes nothing)
        silent = copy.deepcopy(mixer)
        silent.spatial_mamba_mixer.mamba_layer.out_proj.weight.zero_()
        contribution = (ref - silent(x)).abs().max().item()
    assert contribution > 0
    assert (raster - ref).abs().max().item() > 0.1 * contribution


def _reference_sparse_mixer(mixer, hf_mixer, x):
    """Upstream eval semantics, written independently: indexing instead of gather/scatter, transformers' mixer."""
    b, n, c = x.shape
    num = mixer.num_global
    glob = F.adaptive_avg_pool1d(x.permute(0, 2, 1), num).permute(0, 2, 1)
    w = F.softmax(mixer.spatial_gate(x).squeeze(-1), dim=1)
    _, ids = torch.topk(w, n // mixer.keep_ratio, dim=-1)
    rows = torch.arange(b)[:, None]
    seq = torch.cat([glob, x[rows, ids]], dim=1)
    norm_w = mixer.spatial_mamba_mixer.pre_norm.weight
    both = torch.cat([seq, seq.flip(1)], dim=0).float()
    both = norm_w * (both * torch.rsqrt(both.pow(2).mean(-1, keepdim=True) + 1e-5))
    y = hf_mixer(both)
    seq = seq + (y[:b] + y[b:].flip(1)) / 2
    state = seq[:, num:] * w[rows, ids][:, :, None]
    residual = x * w[:, :, None]
    residual[rows, ids] = state
    return x + residual


def test_sparse_mixer_matches_upstream_semantics_with_transformers_mixer():
    model = small_model(seed=4)
    mixer = randomize_parameters(model.layers[1][1][0], seed=5, scale=0.2)  # stage 1 at 64 px: 64 tokens, r=4
    MambaConfig, HFMixer = import_hf_mixer()
    c = 192
    cfg = MambaConfig(hidden_size=c, state_size=16, intermediate_size=2 * c, conv_kernel=4,
                      time_step_rank=math.ceil(c / 16), use_conv_bias=True, hidden_act="silu", use_bias=False,
                      use_mambapy=False, num_hidden_layers=1)
    hf = HFMixer(cfg, 0).eval()
    hf.load_state_dict(mixer.spatial_mamba_mixer.mamba_layer.state_dict())
    x = torch.randn(2, 64, c)
    with torch.inference_mode():
        ref = _reference_sparse_mixer(mixer, hf, x)
        out = mixer(x)
        silent = copy.deepcopy(mixer)
        silent.spatial_mamba_mixer.mamba_layer.out_proj.weight.zero_()
        contribution = (out - silent(x)).abs().max().item()
    assert contribution > 0.1  # the Mamba mixer matters at these weights, so a wrong mixer would show
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_full_size_forward_b512():
    """arch b at 512 px, B = 1: stage-4 map (768, 16, 16) through the chunked scan (timings: benchmarks/)."""
    adapter = DynamicVisAdapter(randomize_parameters(DynamicVisBackbone(DynamicVisConfig()), seed=0),
                                DynamicVisConfig())
    assert adapter.scan_impl == "torch"
    x = torch.randn(1, 3, 512, 512)
    out = adapter.embed(x)
    assert out.grid.shape == (1, 768, 16, 16) and out.pooled.shape == (1, 768)
    assert torch.isfinite(out.grid).all()
    assert torch.allclose(out.pooled, out.grid.mean(dim=(2, 3)))


# --- checkpoints ---------------------------------------------------------------------------------------------
TINY = DynamicVisConfig(image_size=64, num_layers=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return DynamicVisAdapter.write_random_checkpoint(tmp_path_factory.mktemp("dv") / "dv.pth", config=TINY, seed=1)


def test_published_file_loads_strictly_and_ignores_heads(tiny_ckpt):
    raw = torch.load(tiny_ckpt, weights_only=True)
    assert set(raw) == {"meta", "state_dict"}
    heads = [k for k in raw["state_dict"] if not k.startswith("backbone.")]
    assert heads and all(k.startswith(IGNORED_PREFIXES) for k in heads)
    adapter = DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=TINY)
    src = randomize_parameters(DynamicVisBackbone(TINY), seed=1)
    for k, v in src.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[k], v), k
    filtered = DynamicVisAdapter.checkpoint_filter_fn(raw, adapter.model)
    assert not any(k.startswith(IGNORED_PREFIXES) for k in filtered)


def test_unknown_key_fails(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt, weights_only=True)
    raw["state_dict"]["backbone.layers.0.extra.weight"] = torch.zeros(3)
    raw["state_dict"]["auxiliary_head.fc.weight"] = torch.zeros(3)  # not an ignorable prefix
    path = save_atomic(raw, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[auxiliary_head.fc.weight, layers.0.extra.weight\]"):
        DynamicVisAdapter.from_checkpoint(path, config=TINY)


def test_missing_key_fails_naming_it(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt, weights_only=True)
    del raw["state_dict"]["backbone.layers.2.1.0.spatial_mamba_mixer.mamba_layer.A_log"]
    path = save_atomic(raw, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[layers.2.1.0.spatial_mamba_mixer.mamba_layer.A_log\]"):
        DynamicVisAdapter.from_checkpoint(path, config=TINY)


def test_truncated_and_wrong_format_files(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        DynamicVisAdapter.from_checkpoint(bad, config=TINY)
    raw = torch.load(tiny_ckpt, weights_only=True)
    flat = save_atomic({k.removeprefix("backbone."): v for k, v in raw["state_dict"].items()}, tmp_path / "flat.pth")
    with pytest.raises(CheckpointError, match="mmengine file"):
        DynamicVisAdapter.from_checkpoint(flat, config=TINY)
    with pytest.raises(CheckpointError, match="RS_EMBED_DYNAMICVIS_ARCH"):
        DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=dataclasses.replace(TINY, arch="l"))


def test_pos_embed_resized_for_256px(tmp_path):
    """A 512 px file loaded into a 256 px model: bicubic (align_corners=False, fp32) 128x128 -> 64x64 grid."""
    cfg512 = DynamicVisConfig(num_layers=(1, 1, 1, 1))
    path = DynamicVisAdapter.write_random_checkpoint(tmp_path / "dv512.pth", config=cfg512, seed=2)
    src = torch.load(path, weights_only=True)["state_dict"]["backbone.pos_embed"]
    assert src.shape == (1, 16384, 96)
    adapter = DynamicVisAdapter.from_checkpoint(path, config=dataclasses.replace(cfg512, image_size=256))
    got = adapter.model.pos_embed.detach()
    assert got.shape == (1, 4096, 96)
    grid = src.reshape(1, 128, 128, 96).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(64, 64), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, F.interpolate(grid, size=(64, 64), mode="bilinear",
                                                 align_corners=False).flatten(2).transpose(1, 2), atol=1e-4)
    assert adapter.spec.grid_size == 8 and adapter.spec.image_size == 256


# --- preprocessing -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_ckpt):
    return DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=TINY)


MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def test_preprocess_uint8_truncation_without_resize(tiny_adapter):
    raw = np.zeros((1, 3, 64, 64), dtype=np.float32)
    raw[0, 0] = 1000.0      # 0.1 * 255 = 25.5 -> 25 (truncated, not rounded)
    raw[0, 1] = 20000.0     # clipped to 1 -> 255
    raw[0, 2] = 3999.0      # 0.3999 * 255 = 101.97 -> 101
    raw[0, 2, 0, 0] = np.nan
    raw[0, 2, 0, 1] = -50.0
    x = tiny_adapter.preprocess(raw, bands=("B4", "B3", "B2")).numpy()[0]
    u8 = np.array([25.0, 255.0, 101.0], dtype=np.float32)[:, None, None] * np.ones((3, 64, 64), np.float32)
    u8[2, 0, 0] = u8[2, 0, 1] = 0.0
    assert np.allclose(x, (u8 / 255.0 - MEAN) / STD, atol=1e-6)


def test_preprocess_pil_bicubic_resize(tiny_adapter):
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 4000, size=(2, 3, 100, 80)).astype(np.float32)
    x = tiny_adapter.preprocess(raw).numpy()
    assert x.shape == (2, 3, 64, 64)
    for i in range(2):
        u8 = (np.clip(raw[i] / 10000.0, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        resized = np.asarray(Image.fromarray(u8).resize((64, 64), Image.BICUBIC)).astype(np.float32)
        expected = (resized.transpose(2, 0, 1) / 255.0 - MEAN) / STD
        assert np.allclose(x[i], expected, atol=1e-6)
    bilinear = F.interpolate(torch.from_numpy(raw[:1] / 10000.0 * 255 // 1 / 255.0), size=(64, 64), mode="bilinear",
                             align_corners=False).numpy()[0]
    assert not np.allclose(x[0], (bilinear - MEAN) / STD, atol=1e-2)


def test_preprocess_rejects_wrong_channels_and_band_order(tiny_adapter):
    with pytest.raises(AdapterError, match="expects 3 channels in the order B4, B3, B2"):
        tiny_adapter.preprocess(np.zeros((1, 4, 64, 64), np.float32))
    with pytest.raises(AdapterError, match="needs bands in the order B4, B3, B2"):
        tiny_adapter.preprocess(np.zeros((1, 3, 64, 64), np.float32), bands=("B2", "B3", "B4"))
    with pytest.raises(AdapterError, match=r"\(B, C, H, W\)"):
        tiny_adapter.preprocess(np.zeros((3, 64, 64), np.float32))


def test_embed_raw_end_to_end(tiny_adapter):
    raw = np.random.default_rng(1).uniform(0, 3000, size=(2, 3, 70, 50)).astype(np.float32)
    out = tiny_adapter.embed_raw(raw, bands=("B4", "B3", "B2"), pooling="max")
    assert out.pooled.shape == (2, 768) and out.grid.shape == (2, 768, 2, 2)
    assert torch.allclose(out.pooled, out.grid.amax(dim=(2, 3)))
    spec = tiny_adapter.preprocessing_spec()
    assert spec["scan_requested"] == "auto" and spec["scan_resolved"] == "torch"
    assert spec["bands"] == ["B4", "B3", "B2"] and spec["config"]["path_type"] == "forward_reverse_mean"


# --- spec and knobs ------------------------------------------------------------------------------------------
def test_spec():
    spec = DynamicVisAdapter.spec
    assert (spec.model_id, spec.checkpoint_id, spec.sensor, spec.bands) == ("dynamicvis", "dynamicvis", "s2",
                                                                             ("B4", "B3", "B2"))
    assert (spec.chip_size, spec.image_size, spec.embed_dim, spec.grid_size) == (512, 512, 768, 16)
    ck = spec.checkpoint
    assert (ck.hf_repo, ck.file_format, ck.env_prefix) == ("KyanChen/DynamicVis", "mmengine", "RS_EMBED_DYNAMICVIS")
    assert ck.filename == "pretrain_dynamicvis_b_bf16_mamba_best_single-label_f1-score_epoch_170.pth"


@pytest.mark.parametrize("name,value,match", [
    ("MAMBA2", "1", "RS_EMBED_DYNAMICVIS_MAMBA2=1 is not supported"),
    ("PATH_TYPE", "forward_reverse_gate", "gate_layer .* not in the published weights"),
    ("PATH_TYPE", "forward_reverse_shuffle_mean", "not reproducible"),
    ("PATH_TYPE", "shuffle", "RS_EMBED_DYNAMICVIS_PATH_TYPE='shuffle' is refused"),
    ("PATH_TYPE", "sideways", "RS_EMBED_DYNAMICVIS_PATH_TYPE='sideways' is unknown"),
    ("ARCH", "xl", "RS_EMBED_DYNAMICVIS_ARCH='xl'"),
    ("KEEP_RATIOS", "0,4,2,1", "RS_EMBED_DYNAMICVIS_KEEP_RATIOS"),
    ("KEEP_RATIOS", "8,4,2", "exactly 4 integers"),
    ("IMG", "500", "RS_EMBED_DYNAMICVIS_IMG=500 must be a positive multiple of 32"),
    ("SAMPLING_SCALE", "-0.5", "RS_EMBED_DYNAMICVIS_SAMPLING_SCALE"),
    ("SCAN", "gpu", "RS_EMBED_DYNAMICVIS_SCAN='gpu'"),
])
def test_refused_knobs(monkeypatch, name, value, match):
    monkeypatch.setenv(f"RS_EMBED_DYNAMICVIS_{name}", value)
    with pytest.raises(AdapterError, match=match):
        DynamicVisConfig.from_env()


def test_accepted_knobs(monkeypatch):
    cfg = DynamicVisConfig.from_env()
    assert (cfg.arch, cfg.image_size, cfg.path_type, cfg.keep_ratios, cfg.mamba2, cfg.scan) == (
        "b", 512, "forward_reverse_mean", (8, 4, 2, 1), False, "auto")
    for k, v in {"IMG": "256", "PATH_TYPE": "forward", "SAMPLING_SCALE": "0.3", "KEEP_RATIOS": "4,4,2,1",
                 "SCAN": "sequential", "ARCH": "base"}.items():
        monkeypatch.setenv(f"RS_EMBED_DYNAMICVIS_{k}", v)
    cfg = DynamicVisConfig.from_env()
    assert (cfg.arch, cfg.image_size, cfg.path_type, cfg.sampling_scale, cfg.keep_ratios, cfg.scan) == (
        "b", 256, "forward", 0.3, (4, 4, 2, 1), "sequential")
    monkeypatch.setenv("RS_EMBED_DYNAMICVIS_ARCH", "auto")
    monkeypatch.setenv("RS_EMBED_DYNAMICVIS_CKPT_FILE", "pretrain_dynamicvis_l_bf16_mamba_epoch_100.pth")
    assert DynamicVisConfig.from_env().arch == "l"


def test_scan_cuda_refused_on_cpu(tiny_ckpt):
    with pytest.raises(AdapterError, match="RS_EMBED_DYNAMICVIS_SCAN=cuda"):
        DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=dataclasses.replace(TINY, scan="cuda"))


def test_forward_path_type_runs(tiny_ckpt):
    adapter = DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=dataclasses.replace(TINY, path_type="forward"))
    ref = DynamicVisAdapter.from_checkpoint(tiny_ckpt, config=TINY)
    x = torch.randn(1, 3, 64, 64)
    a, b = adapter.embed(x).grid, ref.embed(x).grid
    assert a.shape == b.shape and not torch.allclose(a, b)
