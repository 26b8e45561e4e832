"""Tensor (GPU-side) preprocessing gives exactly the values of each adapter's host preprocessing.

GPU workers copy raw batches in their stored dtype and preprocess them on the device
(``Adapter.preprocess_tensor``); these CPU tests hold that path to the reference one element for element.
"""

import numpy as np
import pytest
import torch

import adapters
from standin import preprocessing_only, raw_batch

MODELS = ["fomo", "terrafm_b", "scalemae_rgb", "agrifm", "dynamicvis"]


@pytest.mark.parametrize("model_id", MODELS)
def test_tensor_preprocessing_equals_host_preprocessing(model_id):
    ad = preprocessing_only(model_id)
    assert ad.device_preprocessing()
    raw = raw_batch(ad)
    want = ad.preprocess(raw.astype(np.float32), bands=ad.spec.bands)
    # the stored dtype (uint16) travels to the device as is and is converted there
    got = ad.preprocess_tensor(torch.from_numpy(raw), bands=ad.spec.bands)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_id", ["fomo", "terrafm_b", "agrifm"])
def test_nan_fill_is_the_same_for_float_composites(model_id):
    ad = preprocessing_only(model_id)
    raw = raw_batch(ad).astype(np.float32)
    raw.reshape(-1)[5::1013] = np.nan
    raw.reshape(-1)[7::2011] = np.inf
    assert torch.equal(ad.preprocess_tensor(torch.from_numpy(raw)), ad.preprocess(raw))


@pytest.mark.parametrize("model_id,config", [("fomo", {"norm": "per_tile_minmax"}), ("fomo", {"norm": "none"}),
                                             ("agrifm", {"norm": "unit_scale"}), ("agrifm", {"norm": "none"})])
def test_every_normalisation_has_the_same_values(model_id, config):
    ad = preprocessing_only(model_id, **config)
    raw = raw_batch(ad)
    assert torch.equal(ad.preprocess_tensor(torch.from_numpy(raw)), ad.preprocess(raw.astype(np.float32)))


def test_configurations_without_an_exact_tensor_path_stay_on_the_host():
    assert not preprocessing_only("scalemae_rgb", image_size=448).device_preprocessing()  # PIL bicubic resize
    assert not preprocessing_only("terrafm_b_s1").device_preprocessing()  # per-chip percentile
    with pytest.raises(adapters.AdapterError, match="no tensor preprocessing"):
        preprocessing_only("terrafm_b_s1").preprocess_tensor(torch.zeros(1, 2, 224, 224))


def test_tensor_preprocessing_checks_the_layout_like_preprocess():
    ad = preprocessing_only("terrafm_b")
    with pytest.raises(adapters.AdapterError, match="expects 12 channels"):
        ad.preprocess_tensor(torch.zeros(1, 3, 224, 224))
    with pytest.raises(adapters.AdapterError, match="needs bands in the order"):
        ad.preprocess_tensor(torch.zeros(1, 12, 224, 224), bands=tuple(reversed(ad.spec.bands)))


def test_uint16_values_above_int16_survive_the_widening():
    from adapters.preprocess import finite_or_zero_tensor

    raw = np.array([0, 1, 10000, 32767, 32768, 50000, 65535], dtype=np.uint16)
    np.testing.assert_array_equal(finite_or_zero_tensor(torch.from_numpy(raw)).numpy(), raw.astype(np.float32))


def test_host_padding_before_the_tensor_steps_equals_padding_after_them():
    """Host ``preprocess`` pads a non-square chip, then runs the tensor steps; rs-embed normalises first and
    pads after. Padding copies values, so per-value steps and per-chip min/max commute with it: same values."""
    from adapters.preprocess import pad_square

    ad = preprocessing_only("fomo", norm="per_tile_minmax", image_size=64)
    raw = raw_batch(ad)[:, :, :64, :40].astype(np.float32)
    raw[0, 0, 3, 5] = np.nan
    x = np.clip(np.nan_to_num(raw, nan=0.0), 0.0, 10000.0) / 10000.0
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    want = pad_square((x - lo) / np.maximum(hi - lo, 1e-6))
    np.testing.assert_array_equal(ad.preprocess(raw).numpy(), want)
