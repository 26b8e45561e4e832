"""FoMo adapter: parity with the FoMo-Bench code vendored in rs-embed, strict loading, preprocessing."""

import numpy as np
import pytest
import torch

from adapters import AdapterError, CheckpointError, create_adapter, get_spec
from adapters.checkpoints import randomize_parameters
from adapters.fomo import DEFAULT_S2_KEYS, FomoAdapter, FomoConfig, S2_BANDS
from conftest import load_rs_embed_vendor


def _reference(depth: int):
    ref = load_rs_embed_vendor("fomo_multimodal_mae")
    model = ref.MultiSpectralViT(image_size=64, patch_size=16, channels=1, num_classes=1000, dim=768, depth=depth,
                                 heads=12, mlp_dim=2048, configs={"modality_channels": {i: i for i in range(37)}})
    return randomize_parameters(model, seed=3).eval()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A depth-2 reference model with non-trivial weights, saved in the published (raw state dict) format."""
    model = _reference(depth=2)
    path = tmp_path_factory.mktemp("fomo") / "fomo_single_embedding_layer_weights.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _raw(b=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 10000, (b, 12, size, size)).astype(np.uint16)


def test_parity_with_vendored_fomo(small_ckpt):
    ref, path = small_ckpt
    ad = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2))
    x = ad.preprocess(_raw())
    out = ad.embed(x)
    with torch.no_grad():
        tokens = ref((x, list(DEFAULT_S2_KEYS)), pool=False)
    assert tokens.shape == (2, 192, 768)
    torch.testing.assert_close(out.pooled, tokens.mean(1), rtol=0, atol=1e-5)
    grid_ref = tokens.reshape(2, 12, 4, 4, 768).mean(1).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.grid, grid_ref, rtol=0, atol=1e-5)
    out_max = ad.embed(x, pooling="max")
    torch.testing.assert_close(out_max.pooled, tokens.amax(1), rtol=0, atol=1e-5)


def test_spectral_keys_matter(small_ckpt, monkeypatch):
    _, path = small_ckpt
    raw = _raw(1)
    a = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2)).embed_raw(raw).pooled
    keys = tuple(reversed(DEFAULT_S2_KEYS))
    b = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2, s2_keys=keys)).embed_raw(raw).pooled
    assert (a - b).abs().max() > 1e-3


def test_full_size_forward_shapes(tmp_path):
    path = FomoAdapter.write_random_checkpoint(tmp_path / "f.pt", config=FomoConfig())
    ad = create_adapter("fomo", checkpoint=str(path), config=FomoConfig())
    out = ad.embed_raw(_raw(1))
    assert out.pooled.shape == (1, 768) and out.grid.shape == (1, 768, 4, 4)
    assert torch.isfinite(out.pooled).all()


def test_published_format_has_145_tensors_and_no_prefix():
    sd = FomoAdapter.published_state_dict(FomoAdapter.build_model(FomoConfig()))
    assert len(sd) == 145 and "mlp_head.weight" in sd and "to_patch_embedding.2.weight" in sd
    assert not any(k.startswith(("module.", "model.")) for k in sd)


def test_strict_loading_names_the_problem(small_ckpt, tmp_path):
    _, path = small_ckpt
    sd = torch.load(path)
    cfg = FomoConfig(depth=2)
    missing = dict(sd); missing.pop("transformer.layers.1.0.to_qkv.weight")
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \[transformer.layers.1.0.to_qkv.weight\]"):
        FomoAdapter.from_checkpoint(tmp_path / "missing.pt", config=cfg)
    extra = dict(sd); extra["decoder.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[decoder.weight\]"):
        FomoAdapter.from_checkpoint(tmp_path / "extra.pt", config=cfg)
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    torch.save(prefixed, tmp_path / "prefixed.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        FomoAdapter.from_checkpoint(tmp_path / "prefixed.pt", config=cfg)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2, mlp_dim=1024))
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="raw state dict"):
        FomoAdapter.from_checkpoint(tmp_path / "wrapped.pt", config=cfg)


def test_truncated_checkpoint_is_a_clear_error(small_ckpt, tmp_path):
    _, path = small_ckpt
    blob = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        FomoAdapter.from_checkpoint(tmp_path / "cut.pt", config=FomoConfig(depth=2))
    with pytest.raises(CheckpointError, match="does not exist"):
        FomoAdapter.from_checkpoint(tmp_path / "nope.pt", config=FomoConfig(depth=2))


def test_preprocessing_matches_rs_embed_unit_scale(small_ckpt):
    _, path = small_ckpt
    ad = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2))
    raw = _raw(1).astype(np.float32)
    raw[0, 0, 0, 0] = 12000  # clipped
    raw[0, 1, 0, 0] = np.nan  # → 0
    x = ad.preprocess(raw).numpy()
    expected = np.clip(np.nan_to_num(raw), 0, 10000) / 10000.0
    np.testing.assert_allclose(x, expected, atol=1e-7)


def test_per_tile_minmax_and_resize(small_ckpt):
    _, path = small_ckpt
    ad = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2, norm="per_tile_minmax"))
    x = ad.preprocess(_raw(1, size=100)).numpy()
    assert x.shape == (1, 12, 64, 64)
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9


def test_bad_input_is_refused(small_ckpt):
    _, path = small_ckpt
    ad = FomoAdapter.from_checkpoint(path, config=FomoConfig(depth=2))
    with pytest.raises(AdapterError, match="expects 12 channels in the order B1, B2"):
        ad.preprocess(np.zeros((1, 10, 64, 64)))
    with pytest.raises(AdapterError, match=r"\(B, C, H, W\)"):
        ad.preprocess(np.zeros((12, 64, 64)))
    wrong = list(S2_BANDS); wrong[1], wrong[3] = wrong[3], wrong[1]
    with pytest.raises(AdapterError, match="needs bands in the order"):
        ad.preprocess(np.zeros((1, 12, 64, 64)), bands=wrong)
    with pytest.raises(AdapterError, match="pooling"):
        ad.embed(ad.preprocess(_raw(1)), pooling="median")


def test_env_knobs(monkeypatch):
    monkeypatch.setenv("RS_EMBED_FOMO_S2_KEYS", "1,2,3")
    with pytest.raises(AdapterError, match="exactly 12"):
        FomoConfig.from_env()
    monkeypatch.setenv("RS_EMBED_FOMO_S2_KEYS", ",".join(str(k) for k in range(6, 18)))
    monkeypatch.setenv("RS_EMBED_FOMO_NORM", "zscore")
    with pytest.raises(AdapterError, match="RS_EMBED_FOMO_NORM"):
        FomoConfig.from_env()
    monkeypatch.setenv("RS_EMBED_FOMO_NORM", "none")
    monkeypatch.setenv("RS_EMBED_FOMO_DEPTH", "3")
    cfg = FomoConfig.from_env()
    assert cfg.depth == 3 and cfg.norm == "none" and cfg.s2_keys[0] == 6


def test_spec():
    spec = get_spec("fomo")
    assert spec.bands == S2_BANDS and spec.chip_size == 64 and spec.grid_resolution_m == 160.0


def test_device_and_dtype_selection_on_cpu(small_ckpt):
    """The GPU code path's knobs, exercised where CI can: reduced precision runs, CUDA fails clearly."""
    _, path = small_ckpt
    cfg = FomoConfig(depth=2)
    raw = _raw(2)
    ref = FomoAdapter.from_checkpoint(path, config=cfg).embed_raw(raw)
    bf16 = FomoAdapter.from_checkpoint(path, config=cfg, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.float32  # autocast: the weights stay float32
    out = bf16.embed_raw(raw)
    assert out.pooled.dtype == torch.float32  # outputs are always handed back as float32
    cos = torch.nn.functional.cosine_similarity(out.pooled, ref.pooled).min()
    assert cos > 0.99, f"bfloat16 embeddings drift from float32 (cosine {cos:.4f})"
    if not torch.cuda.is_available():
        with pytest.raises(AdapterError, match="CUDA is not available"):
            FomoAdapter.from_checkpoint(path, config=cfg, device="cuda")
    with pytest.raises(AdapterError, match="unknown dtype"):
        FomoAdapter.from_checkpoint(path, config=cfg, dtype="float8")


def test_finite_or_zero_equals_nan_to_num():
    from adapters.preprocess import finite_or_zero

    a = np.array([[1.5, np.nan, np.inf], [-np.inf, -2.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(finite_or_zero(a), np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
    assert np.isnan(a).sum() == 1  # the input is not modified in place
    u = np.arange(6, dtype=np.uint16).reshape(2, 3)
    np.testing.assert_array_equal(finite_or_zero(u), u.astype(np.float32))
