"""Checks that catch wrong data, not only NaN: pure functions over arrays, called by the assets.

Each function returns a list of problems (empty = passed), each a sentence naming the partition,
what is wrong and the likely cause, so an asset check's metadata reads as a diagnosis.

- ``vector_problems``          finite, right dimension, no zero-norm or constant vectors
- ``count_problems``           rows in the file = rows in the manifest = chips embedded; embedded +
                               skipped = chips on the lattice
- ``valid_fraction_problems``  each row's valid_fraction equals what the composite's valid counts say
- ``composite_problems``       values in the sensor's physical range, nodata only where no observation,
                               valid pixels that hold data (a lost chunk reads back as fill values)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# S2 L2A DN: reflectance × 10000 (+1000 offset since baseline 04.00); above this is saturation or a scaling bug
S2_MAX_PLAUSIBLE_DN = 20000
S1_MAX_PLAUSIBLE_POWER = 1e4  # linear σ0; dB values or a wrong scale land far outside [0, this]
MAX_BAD_SHARE = 0.01  # at most 1 % of valid pixels may look implausible before the check fails
VALID_FRACTION_TOL = 1e-4


def vector_problems(vectors: np.ndarray, dim: int, *, label: str = "") -> list[str]:
    """Pooled vectors (N, D): finite, D == dim, none of zero norm, none constant across features."""
    where = f"{label}: " if label else ""
    vec = np.asarray(vectors)
    if vec.ndim != 2 or (vec.size and vec.shape[1] != dim):
        return [f"{where}vectors shaped {vec.shape}, expected (N, {dim})"]
    if not vec.shape[0]:
        return []
    problems = []
    finite = np.isfinite(vec).all(axis=1)
    if not finite.all():
        problems.append(f"{where}{int((~finite).sum())} of {len(vec)} vectors hold NaN/inf")
    v = np.where(np.isfinite(vec), vec, 0.0).astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    zero = norms == 0
    if zero.any():
        problems.append(f"{where}{int(zero.sum())} of {len(vec)} vectors are all zeros (chips never embedded, "
                        "e.g. a batch size < 1, or a model that returns nothing)")
    constant = (~zero) & (np.ptp(v, axis=1) == 0) if dim > 1 else np.zeros(len(v), bool)
    if constant.any():
        problems.append(f"{where}{int(constant.sum())} of {len(vec)} vectors are constant across all {dim} "
                        "features (a collapsed model or a broken checkpoint)")
    return problems


def count_problems(*, rows_in_file: int, manifest: dict, chips_expected: int | None = None,
                   label: str = "") -> list[str]:
    """The partition's row counts agree: file, manifest, chips embedded, and the lattice."""
    where = f"{label}: " if label else ""
    problems = []
    m_rows = manifest.get("rows")
    embedded = manifest.get("chips_embedded", m_rows)
    if m_rows is not None and rows_in_file != m_rows:
        problems.append(f"{where}the vectors file has {rows_in_file} rows, its manifest says {m_rows} "
                        "(vectors and manifest of different writes)")
    if embedded is not None and rows_in_file != embedded:
        problems.append(f"{where}{rows_in_file} rows for {embedded} chips embedded")
    total, skipped = manifest.get("chips_total"), manifest.get("chips_skipped")
    if total is not None and embedded is not None and skipped is not None and embedded + skipped != total:
        problems.append(f"{where}{embedded} embedded + {skipped} skipped chips != {total} chips on the tile")
    if chips_expected is not None and total is not None and total != chips_expected:
        problems.append(f"{where}the manifest counts {total} chips, the tile's lattice has {chips_expected}")
    return problems


def chip_valid_fractions(valid: np.ndarray, *, x0: float, y0: float, pixel_m: float, minx: Sequence[float],
                         maxy: Sequence[float], size_px: Sequence[int]) -> np.ndarray:
    """Share of valid pixels in each chip, from (T, H, W) or (H, W) validity of a grid anchored at (x0, y0).

    Chips that reach outside the grid get NaN (they cannot be checked against this composite).
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim == 2:
        valid = valid[None]
    _, H, W = valid.shape
    out = np.full(len(minx), np.nan)
    for i, (mx, my, s) in enumerate(zip(minx, maxy, size_px)):
        c, r = int(round((mx - x0) / pixel_m)), int(round((y0 - my) / pixel_m))
        if r < 0 or c < 0 or r + s > H or c + s > W:
            continue
        out[i] = valid[:, r:r + s, c:c + s].mean()
    return out


def valid_fraction_problems(recorded: Sequence[float], expected: np.ndarray, *, chip_ids: Sequence[str] = (),
                            label: str = "") -> list[str]:
    """Recorded valid_fraction per row against the composite's valid counts (NaN expected = not checkable)."""
    where = f"{label}: " if label else ""
    rec = np.asarray(recorded, dtype=np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    checkable = np.isfinite(exp)
    bad = checkable & ~(np.abs(rec - exp) <= VALID_FRACTION_TOL)
    if not bad.any():
        return []
    i = int(np.flatnonzero(bad)[0])
    chip = chip_ids[i] if len(chip_ids) > i else f"row {i}"
    return [f"{where}{int(bad.sum())} of {int(checkable.sum())} chips record a valid_fraction that the composite's "
            f"valid counts contradict (e.g. {chip}: recorded {rec[i]:.4f}, composite says {exp[i]:.4f}); the "
            "composite changed after embedding or was read damaged — re-materialise both"]


def composite_block_stats(data: np.ndarray, valid_count: np.ndarray, *, sensor: str) -> dict[str, int]:
    """Counts over one block of a composite (band, y, x) / (y, x); add blocks up, then ``composite_problems``."""
    data = np.asarray(data)
    valid = np.asarray(valid_count) > 0
    px = data[:, valid]  # (band, n_valid)
    stats = {"pixels": int(valid.size), "valid": int(valid.sum()), "valid_empty": 0, "valid_implausible": 0,
             "nodata_with_data": 0}
    if sensor == "s2":
        stats["valid_empty"] = int((px == 0).all(axis=0).sum())
        stats["valid_implausible"] = int((px > S2_MAX_PLAUSIBLE_DN).any(axis=0).sum())
        stats["nodata_with_data"] = int((data[:, ~valid] != 0).any(axis=0).sum())
    elif sensor == "s1":
        pxf = px.astype(np.float64)
        finite = np.isfinite(pxf)
        stats["valid_empty"] = int((~finite.any(axis=0)).sum())
        stats["valid_implausible"] = int((finite & ((pxf < 0) | (pxf > S1_MAX_PLAUSIBLE_POWER))).any(axis=0).sum())
        stats["nodata_with_data"] = int(np.isfinite(data[:, ~valid].astype(np.float64)).any(axis=0).sum())
    return stats


def add_stats(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def composite_problems(stats: dict[str, int], *, sensor: str, recorded_valid_fraction=None,
                       label: str = "") -> list[str]:
    """A composite's values against its sensor's physical range and its own validity mask.

    ``stats`` from ``composite_block_stats`` (summed over blocks). Pixels with observations must
    hold data (a lost zarr chunk reads back as the fill value: all-zero S2 / NaN S1 pixels that
    claim observations); pixels without observations hold nodata (0 for S2, NaN for S1).
    """
    where = f"{label}: " if label else ""
    problems = []
    n, n_valid = stats["pixels"], stats["valid"]
    if recorded_valid_fraction is not None and n:
        actual = n_valid / n
        if abs(actual - float(recorded_valid_fraction)) > VALID_FRACTION_TOL:
            problems.append(f"{where}valid_fraction attribute {float(recorded_valid_fraction):.4f} but the valid "
                            f"counts give {actual:.4f}")
    if n_valid:
        empty, high = stats["valid_empty"] / n_valid, stats["valid_implausible"] / n_valid
        if empty > MAX_BAD_SHARE:
            fill = "all bands 0" if sensor == "s2" else "NaN in every band"
            problems.append(f"{where}{empty:.1%} of pixels with observations have {fill} (a lost data chunk, or a "
                            "provider that returned fill values)")
        if high > MAX_BAD_SHARE:
            rng = (f"exceed {S2_MAX_PLAUSIBLE_DN} DN (saturation or reflectance scaled twice)" if sensor == "s2" else
                   f"lie outside linear power [0, {S1_MAX_PLAUSIBLE_POWER:g}] (dB values or a wrong scale)")
            problems.append(f"{where}{high:.1%} of valid pixels {rng}")
    if stats["nodata_with_data"]:
        nodata = "0" if sensor == "s2" else "NaN"
        problems.append(f"{where}{stats['nodata_with_data']} pixels without observations hold data (nodata is "
                        f"{nodata})")
    return problems


# --- whole partitions (read through Storage: verified) ----------------------------------------
def check_embedding_partition(table, manifest: dict, *, dim: int, valid_masks: Sequence[np.ndarray] = (),
                              origin: tuple[float, float] | None = None, chips_expected: int | None = None,
                              label: str = "") -> list[str]:
    """Vectors (a pyarrow Table) of one partition against its manifest, the lattice and its composites.

    ``valid_masks``: (H, W) validity of each frame's composite, all on one grid whose upper-left
    corner is ``origin`` (UTM x0, y0) at 10 m.
    """
    n = table.num_rows
    problems = count_problems(rows_in_file=n, manifest=manifest, chips_expected=chips_expected, label=label)
    if not n:
        return problems
    emb = table.column("embedding").combine_chunks()
    vec = np.asarray(emb.flatten()).reshape(n, -1)
    problems += vector_problems(vec, dim, label=label)
    if len(valid_masks) and origin is not None:
        expected = chip_valid_fractions(np.stack(valid_masks), x0=origin[0], y0=origin[1], pixel_m=10.0,
                                        minx=table.column("utm_minx").to_numpy(),
                                        maxy=table.column("utm_maxy").to_numpy(),
                                        size_px=table.column("chip_size_px").to_numpy())
        problems += valid_fraction_problems(table.column("valid_fraction").to_numpy(), expected,
                                            chip_ids=table.column("chip_id").to_pylist(), label=label)
    return problems


def partition_problems(storage, model_id: str, manifest: dict, dim: int) -> list[str]:
    """Read one committed embedding partition (vectors + its composites, verified) and run the checks above."""
    import pyarrow.parquet as pq

    import adapters

    from .grid import parse_tile_key
    from .lattice import chip_lattice

    spec = adapters.get_spec(model_id)
    tile, month = manifest["tile"], manifest["month"]
    label = f"{tile}/{month}"
    table = pq.read_table(storage.resolve(manifest["vectors_path"]),
                          columns=["chip_id", "embedding", "utm_minx", "utm_maxy", "chip_size_px", "valid_fraction"])
    expected = chip_lattice(parse_tile_key(tile), spec.chip_size).count
    masks, origin = [], None
    for m in manifest.get("frame_months") or [month]:
        reader = storage.open_composite(spec.sensor, tile, m)  # verified: block checksums
        masks.append(reader.valid_rows(0, reader.height) > 0)
        t = reader.record["transform"]
        if origin is not None and (t[0], t[3]) != origin:
            return [f"{label}: the frames' composites are on different grids"]
        origin = (t[0], t[3])
    return check_embedding_partition(table, manifest, dim=dim, valid_masks=masks, origin=origin,
                                     chips_expected=expected, label=label)


def composite_partition_problems(storage, sensor: str, tile: str, month: str) -> list[str]:
    """Read one committed composite back (verified, block by block) and run ``composite_problems``."""
    reader = storage.open_composite(sensor, tile, month)
    stats: dict[str, int] = {}
    for y0 in range(0, reader.height, reader.block_rows):
        data, valid = reader.rows(y0, min(reader.height, y0 + reader.block_rows))
        stats = add_stats(stats, composite_block_stats(data, valid, sensor=sensor))
    return composite_problems(stats, sensor=sensor, recorded_valid_fraction=reader.record.get("valid_fraction"),
                              label=f"{tile}/{month}")
