"""Partitions: tiles (dynamic, added from areas of interest) × months (time windows)."""

from __future__ import annotations

import os

import dagster as dg

from .composite import parse_month
from .settings import start_month

TILES = dg.DynamicPartitionsDefinition(name="tiles")
START_MONTH = start_month()  # RS_EMBED_ASSETS_START_MONTH, validated (the error names the variable)
MONTHS = dg.MonthlyPartitionsDefinition(start_date=f"{START_MONTH}-01", end_offset=0)
TILE_MONTH = dg.MultiPartitionsDefinition({"month": MONTHS, "tile": TILES})


def partitions_per_run() -> int:
    """Tile-months per backfill run (RS_EMBED_ASSETS_PARTITIONS_PER_RUN, default 128).

    A backfill over tiles × months is split by Dagster into one range per month (the dimension with
    fewer keys), each cut into runs of at most this many tiles; every run loads each model once and
    embeds all its partitions. Fewer, larger runs mean fewer run creations for the daemon, but while
    the embedding checks are partitioned Dagster 1.13 stores one planned-check row per partition,
    each holding the run's whole partition subset: creating a run costs O(n²) in its partitions
    (≈ 20 s for 500 here). 128 balances the two (benchmarks/bench_backfill.py, README).
    """
    raw = os.environ.get("RS_EMBED_ASSETS_PARTITIONS_PER_RUN", "").strip() or "128"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"RS_EMBED_ASSETS_PARTITIONS_PER_RUN={raw!r} must be a whole number >= 1 (default 128)")
    return int(raw)


BATCH_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run())


def add_tiles(instance: dg.DagsterInstance, keys: list[str]) -> list[str]:
    """Add tile keys as ``tiles`` partitions (validated and normalised first); returns the ones that were new.

    Keys are stored in their canonical spelling (``31UFU-k36-r21-c012`` → ``31UFU-k36-r21-c12``), so one tile
    never becomes two partitions.
    """
    from .grid import canonical_tile_key

    keys = [canonical_tile_key(key) for key in keys]  # refuse malformed keys before they become partitions
    existing = set(instance.get_dynamic_partitions(TILES.name))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    if new:
        instance.add_dynamic_partitions(TILES.name, new)
    return new


def split_key(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """A tile×month partition key → (tile key, 'YYYY-MM')."""
    if not isinstance(key, dg.MultiPartitionKey):
        key = TILE_MONTH.get_partition_key_from_str(str(key))
    dims = key.keys_by_dimension
    return dims["tile"], parse_month(dims["month"])


def make_key(tile: str, month: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"tile": tile, "month": f"{parse_month(month)}-01"})


def month_partition(value: str) -> str:
    """``2024-06`` or ``2024-06-01`` → ``2024-06`` when that month is a partition, else a clear error.

    Months run from RS_EMBED_ASSETS_START_MONTH to the latest completed month (a month becomes a
    partition once it is over, so its composite is final).
    """
    month = parse_month(value)
    first, last = MONTHS.get_first_partition_key(), MONTHS.get_last_partition_key()
    if f"{month}-01" < first:
        raise ValueError(f"month {value!r} is before the first month partition {first[:7]}; use a month from "
                         f"{first[:7]} on, or set RS_EMBED_ASSETS_START_MONTH earlier")
    if last is None or f"{month}-01" > last:
        latest = last[:7] if last else "none yet"
        raise ValueError(f"month {value!r} is not a partition yet: months become partitions once they are over "
                         f"(latest: {latest})")
    return month
