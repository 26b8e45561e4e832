"""Asset definitions (thin over rs_embed_assets.materialize)."""
