"""The GPU code paths, exercised on the CPU: autocast precision, fused attention, the pinned/streamed
host-to-device feed, ``torch.compile``. (tests/gpu/ runs the same paths on a real CUDA device.)"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.agrifm import AgriFMAdapter, AgriFMConfig
from adapters.base import DeviceFeeder, autocast_context
from adapters.fomo import FomoAdapter, FomoConfig
from adapters.terrafm import TerraFMConfig, TerraFMS2Adapter


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q·kᵀ·scale + mask)·v written out, as the adapters computed it before the fused kernel."""
    assert dropout_p == 0.0 and not is_causal
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(dim=-1) @ v


def _adapter(cls, cfg, tmp_path, dtype="float32", **kw):
    path = cls.write_random_checkpoint(tmp_path / f"{cls.__name__}.pt", config=cfg, seed=1)
    return cls.from_checkpoint(path, config=cfg, dtype=dtype, **kw)


def _s2(b, c, size, seed=0):
    return np.random.default_rng(seed).integers(0, 10000, (b, c, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def fomo(tmp_path_factory):
    return _adapter(FomoAdapter, FomoConfig(depth=2), tmp_path_factory.mktemp("fomo"))


def test_fomo_fused_attention_is_within_1e6_of_the_explicit_formula(fomo, monkeypatch):
    """FoMo runs scaled_dot_product_attention everywhere: float32 outputs stay within 1e-6 of
    softmax(q·kᵀ·scale)·v (at full depth 12 the measured gap is 4.8e-7)."""
    x = fomo.preprocess(_s2(3, 12, 64))
    fused = fomo.embed(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    explicit = fomo.embed(x)
    torch.testing.assert_close(fused.pooled, explicit.pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.grid, explicit.grid, rtol=0, atol=1e-6)


def test_agrifm_fused_window_attention_matches_the_explicit_formula(tmp_path, monkeypatch):
    """AgriFM's CUDA branch (fused kernel with relative-position bias and shifted-window mask), forced on
    the CPU: within a few float32 ulps of the explicit formula the CPU keeps (bit-identical there)."""
    from adapters.agrifm import WindowAttention3D

    cfg = AgriFMConfig(frames=2, image_size=56, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2),
                       embed_dim=16, window_size=(2, 7, 7))
    ad = _adapter(AgriFMAdapter, cfg, tmp_path)
    x = ad.preprocess(np.stack([_s2(2, 10, 56, seed=s) for s in (1, 2)], axis=1))
    cpu = ad.embed(x)
    monkeypatch.setattr(WindowAttention3D, "fused", True)
    fused = ad.embed(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    explicit = ad.embed(x)
    assert torch.equal(cpu.grid, explicit.grid)  # the CPU path is the explicit formula
    assert not torch.equal(fused.grid, explicit.grid)  # the fused branch really ran
    scale = explicit.grid.abs().max()
    torch.testing.assert_close(fused.grid, explicit.grid, rtol=0, atol=float(4e-6 * scale / 4.3))
    torch.testing.assert_close(fused.pooled, explicit.pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_is_autocast_with_float32_weights_and_outputs(fomo, tmp_path, dtype):
    low = _adapter(FomoAdapter, FomoConfig(depth=2), tmp_path, dtype=dtype)
    assert {p.dtype for p in low.model.parameters()} == {torch.float32}
    x = low.preprocess(_s2(4, 12, 64))
    assert x.dtype == torch.float32
    out, ref = low.embed(x), fomo.embed(x)
    assert out.pooled.dtype == out.grid.dtype == torch.float32
    cos = F.cosine_similarity(out.pooled, ref.pooled)
    assert cos.min() >= 0.999, f"{dtype} pooled cosine to float32 {cos.tolist()}"
    assert not torch.equal(out.pooled, ref.pooled)  # it really ran in reduced precision


def test_bfloat16_agreement_at_224_px(tmp_path):
    """A 224 px ViT (TerraFM-B width, depth 2): pooled cosine to float32 >= 0.999 for every chip."""
    cfg = TerraFMConfig(depth=2)
    ref = _adapter(TerraFMS2Adapter, cfg, tmp_path)
    low = _adapter(TerraFMS2Adapter, cfg, tmp_path, dtype="bfloat16")
    x = ref.preprocess(_s2(2, 12, 224))
    cos = F.cosine_similarity(low.embed(x).pooled, ref.embed(x).pooled)
    assert cos.min() >= 0.999, cos.tolist()


def test_float32_runs_without_autocast():
    assert not isinstance(autocast_context(torch.device("cpu"), torch.float32), torch.autocast)
    assert isinstance(autocast_context(torch.device("cpu"), torch.bfloat16), torch.autocast)


class RecordingCuda:
    """Stands in for the ``torch.cuda`` module (streams and events) where there is no GPU; records the calls."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.active = None

    def Stream(self, device=None):  # noqa: N802 - the torch.cuda name
        return ("copy-stream", device)

    def stream(self, s):
        cuda = self

        class Ctx:
            def __enter__(self):
                cuda.active = s

            def __exit__(self, *exc):
                cuda.active = None

        return Ctx()

    def Event(self):  # noqa: N802
        cuda = self

        class Event:
            def record(self, stream):
                cuda.calls.append(("record", stream[0], id(self)))

        return Event()

    def current_stream(self, device=None):
        cuda = self

        class Compute:
            def wait_event(self, event):
                cuda.calls.append(("wait", "compute", id(event)))

        return Compute()


def test_device_feeder_without_cuda_is_a_pass_through():
    feeder = DeviceFeeder("cpu")
    assert not feeder.overlap and feeder.host_device is None
    x = torch.ones(2, 3)
    assert feeder.pin(x) is x
    items = [("a", x), ("b", x)]
    out = list(feeder.iter_on_device(iter(items)))
    assert out == items and out[0][1] is x


def test_device_feeder_pins_copies_on_a_side_stream_one_batch_ahead():
    cuda = RecordingCuda()
    pinned = []
    feeder = DeviceFeeder("cpu", cuda=cuda, overlap=True, pin_memory=lambda t: pinned.append(t) or t.clone())
    assert feeder.host_device == torch.device("cpu")
    batches = [(i, feeder.pin(torch.full((2, 2), float(i)))) for i in range(3)]
    assert len(pinned) == 3
    seen = []
    for key, x in feeder.iter_on_device(iter(batches)):
        seen.append(key)
        assert torch.equal(x, torch.full((2, 2), float(key)))
        records = [c for c in cuda.calls if c[0] == "record"]
        waits = [c for c in cuda.calls if c[0] == "wait"]
        # the copy of the next batch is recorded on the copy stream before this one is computed
        assert len(records) == min(key + 2, 3) and len(waits) == key + 1
        assert all(r[1] == "copy-stream" for r in records)
        assert waits[-1][2] == records[key][2]  # compute waits on exactly this batch's copy event
    assert seen == [0, 1, 2]


def test_engine_cuda_feed_path_gives_the_same_rows(tmp_path, fomo, monkeypatch):
    """The engine's CUDA branch on the CPU (pin, side-stream copy; preprocessing on the device, or on the host
    where the adapter has no tensor path): the same vectors as the plain path."""
    import pyarrow.parquet as pq

    from rs_embed_assets.materialize import EmbeddingSettings, materialize_composite, materialize_embeddings
    from rs_embed_assets.providers import create_provider
    from rs_embed_assets.storage import Storage

    key, ck = "31UFU-k36-r21-c12", {"sha256": "c" * 64, "random_init": True, "source_uri": "test"}
    st = Storage(tmp_path / "data")
    materialize_composite(st, create_provider("sample"), "s2", key, "2024-07")
    materialize_embeddings(st, fomo, key, "2024-07", ck, EmbeddingSettings(batch_size=4, grid_dtype="float32"))
    plain = pq.read_table(st.vectors_path("fomo", key, "2024-07"))
    for device_side in (True, False):
        cuda, pinned = RecordingCuda(), []
        monkeypatch.setattr(fomo, "device_feeder", lambda: DeviceFeeder(
            "cpu", cuda=cuda, overlap=True, pin_memory=lambda t: pinned.append((t.device.type, t.dtype)) or t))
        monkeypatch.setattr(fomo, "device_preprocessing", lambda: device_side)
        host_preprocess = []
        monkeypatch.setattr(fomo, "preprocess", lambda *a, _p=type(fomo).preprocess, **k: host_preprocess.append(1)
                            or _p(fomo, *a, **k))
        materialize_embeddings(st, fomo, key, "2024-07", ck, EmbeddingSettings(batch_size=4, grid_dtype="float32"))
        fed = pq.read_table(st.vectors_path("fomo", key, "2024-07"))
        # 16 chips in batches of 4, each pinned on the host: raw uint16 when the device preprocesses
        assert pinned == [("cpu", torch.uint16 if device_side else torch.float32)] * 4
        assert len(host_preprocess) == (0 if device_side else 4)
        assert sum(c[0] == "wait" for c in cuda.calls) == 4
        assert fed.column("embedding").to_pylist() == plain.column("embedding").to_pylist()


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compile_flag_compiles_or_falls_back_with_a_log_line(tmp_path, monkeypatch, caplog):
    cfg = FomoConfig(depth=1, dim=64, heads=2, dim_head=32, mlp_dim=128)
    eager = _adapter(FomoAdapter, cfg, tmp_path)
    assert not eager.compile
    monkeypatch.setenv("RS_EMBED_COMPILE", "1")
    ad = _adapter(FomoAdapter, cfg, tmp_path)
    assert ad.compile
    x = ad.preprocess(_s2(2, 12, 64))
    with caplog.at_level(logging.WARNING, logger="adapters.base"):
        out = ad.embed(x)
    ref = eager.embed(x)
    torch.testing.assert_close(out.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.grid, ref.grid, rtol=1e-5, atol=1e-5)
    failed = ad._compiled.failed
    assert (failed is None) == ("torch.compile of fomo failed" not in caplog.text)


def test_cuda_batch_defaults_follow_the_documented_rule_from_the_measured_activations():
    """spec.default_batch_size["cuda"] is the 24 GB figure the rule derives from the committed measurement."""
    import json
    from pathlib import Path

    import adapters

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "activation_memory_cpu.json"
    rows = {r["model"]: r for r in json.loads(path.read_text())["models"]}
    assert set(rows) == set(adapters.list_models())
    for model_id, row in rows.items():
        assert adapters.get_spec(model_id).default_batch_size["cuda"] == row["batch_24gb"], model_id
