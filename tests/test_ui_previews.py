"""Previews: the PNG writer round-trips, quick-looks and PCA pictures have the right shape and size."""

import base64
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest

from rs_embed_assets import previews


def decode_png(png: bytes) -> np.ndarray:
    """Independent minimal PNG reader (8-bit, filters 0 and 2) for checking what encode_png wrote."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        tag, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + data) & 0xFFFFFFFF, f"bad CRC in {tag}"
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif tag == b"IDAT":
            idat += data
        pos += 12 + n
    w, h, depth, colour, *_ = header
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    out = np.zeros((h, w * channels), np.uint8)
    for y in range(h):
        f, row = raw[y, 0], raw[y, 1:]
        assert f in (0, 2)
        out[y] = row if f == 0 or y == 0 else (row.astype(np.int32) + out[y - 1]) % 256
    return out.reshape(h, w, channels) if channels == 3 else out.reshape(h, w)


def test_png_round_trips_rgb_and_grey():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(previews.encode_png(rgb)), rgb)
    grey = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(previews.encode_png(grey)), grey)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8)])
def test_png_refuses_what_it_cannot_write(bad):
    with pytest.raises(ValueError, match="encode_png"):
        previews.encode_png(bad)


def test_s2_quicklook_is_true_colour_downsampled_and_blank_where_no_data():
    bands = ["B2", "B3", "B4", "B8"]
    data = np.zeros((4, 600, 300), np.uint16)
    data[2, :, :150] = 3000  # red on the left half
    data[1, :, 150:] = 3000  # green on the right half
    data[0] = 100
    data[:, :100] = 0  # top rows: no observation
    img = previews.composite_rgb(data, bands, "s2", max_px=120)
    assert img.shape == (120, 60, 3) and img.dtype == np.uint8
    assert (img[:15] == 0).all(), "no-data pixels must be black"
    left, right = img[60, 10], img[60, 50]
    assert left[0] > left[1] and right[1] > right[0]


def test_s1_false_colour_uses_vv_vh_and_their_ratio():
    vv = np.full((50, 50), 0.1, np.float32)
    vh = np.full((50, 50), 0.01, np.float32)
    vv[:, 25:] = 0.001  # water: dark in VV
    img = previews.composite_rgb(np.stack([vv, vh]), ["VV", "VH"], "s1", max_px=50)
    assert img.shape == (50, 50, 3)
    assert img[10, 5, 0] > img[10, 40, 0]
    with pytest.raises(ValueError, match="VV and VH"):
        previews.composite_rgb(np.stack([vv]), ["HH"], "s1")


def test_pca_colours_separate_distinct_embeddings_and_are_deterministic():
    rng = np.random.default_rng(0)
    grid = np.zeros((32, 16, 16), np.float32)
    grid[:, :, :8] = rng.normal(size=(32, 1, 1)) * 5
    grid[:, :, 8:] = rng.normal(size=(32, 1, 1)) * 5
    grid += rng.normal(size=grid.shape).astype(np.float32) * 0.01
    grid[:, 0, 0] = np.nan  # a cell without a vector
    a, b = previews.pca_rgb(grid), previews.pca_rgb(grid)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (128, 128, 3)  # 16 px grid repeated ×8 so it is visible
    assert (a[0, 0] == 0).all()
    assert np.abs(a[64, 16].astype(int) - a[64, 112].astype(int)).sum() > 100


def test_markdown_image_is_a_data_uri_within_budget():
    img = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)  # incompressible noise
    png = previews.fit_png(lambda px: img[:px, :px], max_px=512)
    md = previews.markdown_image(png, "rgb")
    assert md.startswith("![rgb](data:image/png;base64,") and len(md) <= previews.PNG_BUDGET_BYTES + 100
    assert base64.b64decode(md[len("![rgb](data:image/png;base64,"):-1]) == png


def test_sample_rows_leave_out_vectors_and_geometry():
    t = pa.table({"chip_id": ["a", "b", "c"], "valid_fraction": [1.0, 0.5, 0.25],
                  "embedding": [[1.0, 2.0]] * 3, "geometry": [b"\x01"] * 3})
    md = previews.sample_rows_markdown(t, 2)
    lines = md.splitlines()
    assert lines[0] == "| chip_id | valid_fraction |" and len(lines) == 4
    assert "embedding" not in md and "geometry" not in md
