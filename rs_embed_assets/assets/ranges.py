"""Range runs record what they completed, so the data root and Dagster agree after a failure.

A run over many partitions (``context.partition_keys``) reports its materialisations when its step
returns. If partition 2 of 16 fails, partition 1 is already committed on disk; without a record
Dagster would show it as missing while its files are there (and the next backfill would redo it).
``completed_partitions`` logs one materialisation per partition that finished before the failure,
then lets the failure propagate:

    with completed_partitions(context) as done:
        for pkey in context.partition_keys:
            ...                      # write and commit the partition
            done[pkey] = {"rows": n} # its metadata, recorded only if a later partition fails
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import dagster as dg


@contextmanager
def completed_partitions(context: dg.AssetExecutionContext,
                         asset_key: dg.AssetKey | None = None) -> Iterator[dict[str, dict]]:
    done: dict[str, dict] = {}
    try:
        yield done
    except BaseException:
        # the failed step reports no materialisation itself, so these are the only records of the committed ones
        key = asset_key or context.asset_key
        for pkey, metadata in done.items():
            context.log_event(dg.AssetMaterialization(
                asset_key=key, partition=str(pkey),
                metadata={**(metadata or {}), "recorded": "committed before the run failed"}))
        if done:
            context.log.warning(f"{key.to_user_string()}: {len(done)} of {len(context.partition_keys)} partitions "
                                "were committed before the failure and are recorded as materialised")
        raise
