"""Asset definitions (thin over rs_embed_assets.materialize)."""

import warnings

import dagster as dg

# backfill_policy and MultiPartitionMapping are marked beta in Dagster 1.13; we rely on them knowingly
warnings.filterwarnings("ignore", category=dg.BetaWarning)
