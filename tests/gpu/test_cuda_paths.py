"""The GPU code paths on a real CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs them).

Their CPU counterparts are in tests/test_gpu_path.py; these check what only a GPU can: pinned memory,
the side-stream copy, autocast on CUDA, the fused kernels and the engine end to end.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from adapters.base import DeviceFeeder
from adapters.fomo import FomoAdapter, FomoConfig
from test_gpu_path import _adapter, _s2, explicit_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = FomoConfig(depth=2)
    return cfg, FomoAdapter.write_random_checkpoint(tmp_path_factory.mktemp("fomo") / "f.pt", config=cfg, seed=1)


def test_feeder_pins_and_copies_on_a_side_stream():
    feeder = DeviceFeeder("cuda")
    assert feeder.overlap and feeder.stream is not None
    host = feeder.pin(torch.arange(4096, dtype=torch.float32).reshape(64, 64))
    assert host.is_pinned()
    items = [(i, feeder.pin(torch.full((256, 256), float(i)))) for i in range(4)]
    for i, x in feeder.iter_on_device(iter(items)):
        assert x.is_cuda
        assert float((x * 2).sum()) == 2 * i * 256 * 256  # compute after the event sees the whole copy


def test_cuda_float32_matches_cpu_and_bfloat16_agrees(ckpt):
    cfg, path = ckpt
    raw = _s2(8, 12, 64)
    cpu = FomoAdapter.from_checkpoint(path, config=cfg).embed_raw(raw)
    gpu = FomoAdapter.from_checkpoint(path, config=cfg, device="cuda")
    out = gpu.embed_raw(raw)
    assert out.pooled.device.type == "cuda"
    torch.testing.assert_close(out.pooled.cpu(), cpu.pooled, rtol=1e-4, atol=1e-4)
    bf16 = FomoAdapter.from_checkpoint(path, config=cfg, device="cuda", dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    low = bf16.embed_raw(raw)
    assert low.pooled.dtype == torch.float32
    assert F.cosine_similarity(low.pooled.cpu(), cpu.pooled).min() >= 0.999


def test_preprocess_can_stay_on_the_host(ckpt):
    cfg, path = ckpt
    ad = FomoAdapter.from_checkpoint(path, config=cfg, device="cuda")
    assert ad.preprocess(_s2(2, 12, 64)).is_cuda  # public behaviour: the adapter's device
    assert ad.preprocess(_s2(2, 12, 64), device="cpu").device.type == "cpu"


def test_agrifm_fused_attention_on_cuda(tmp_path, monkeypatch):
    from adapters.agrifm import AgriFMAdapter, AgriFMConfig

    cfg = AgriFMConfig(frames=2, image_size=56, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2), embed_dim=16,
                       window_size=(2, 7, 7))
    ad = _adapter(AgriFMAdapter, cfg, tmp_path, device="cuda")
    x = ad.preprocess(np.stack([_s2(2, 10, 56, seed=s) for s in (1, 2)], axis=1))
    fused = ad.embed(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    explicit = ad.embed(x)
    torch.testing.assert_close(fused.grid, explicit.grid, rtol=0, atol=1e-4)


def test_engine_on_cuda_gives_the_cpu_rows(tmp_path, ckpt):
    from rs_embed_assets.materialize import EmbeddingSettings, materialize_composite, materialize_embeddings
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.storage import Storage

    cfg, path = ckpt
    key, rec = "31UFU-k36-r21-c12", {"sha256": "c" * 64, "random_init": True, "source_uri": "test"}
    st = Storage(tmp_path / "data")
    materialize_composite(st, create_provider("sample"), "s2", key, "2024-07")
    rows = {}
    for device in ("cpu", "cuda"):
        ad = FomoAdapter.from_checkpoint(path, config=cfg, device=device)
        materialize_embeddings(st, ad, key, "2024-07", rec, EmbeddingSettings(batch_size=4, grid_dtype="float32"))
        rows[device] = np.array(pq.read_table(st.vectors_path("fomo", key, "2024-07")).column("embedding").to_pylist())
    np.testing.assert_allclose(rows["cuda"], rows["cpu"], rtol=1e-4, atol=1e-4)


def test_compile_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_EMBED_COMPILE", "1")
    cfg = FomoConfig(depth=1, dim=64, heads=2, dim_head=32, mlp_dim=128)
    ad = _adapter(FomoAdapter, cfg, tmp_path, device="cuda")
    monkeypatch.delenv("RS_EMBED_COMPILE")
    eager = _adapter(FomoAdapter, cfg, tmp_path, device="cuda")
    x = ad.preprocess(_s2(4, 12, 64))
    torch.testing.assert_close(ad.embed(x).pooled, eager.embed(x).pooled, rtol=1e-4, atol=1e-4)
    assert ad._compiled.failed is None, ad._compiled.failed


@pytest.mark.parametrize("model_id", ["fomo", "terrafm_b", "scalemae_rgb", "agrifm", "dynamicvis"])
def test_device_preprocessing_on_cuda_equals_host_preprocessing(model_id):
    """What GPU workers do: the raw uint16 batch is pinned, copied and preprocessed on the device."""
    from standin import preprocessing_only, raw_batch

    ad = preprocessing_only(model_id)
    raw = raw_batch(ad)
    want = ad.preprocess(raw.astype(np.float32), bands=ad.spec.bands)
    x = torch.from_numpy(raw).pin_memory().to("cuda", non_blocking=True)
    got = ad.preprocess_tensor(x, bands=ad.spec.bands)
    assert got.is_cuda and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)
