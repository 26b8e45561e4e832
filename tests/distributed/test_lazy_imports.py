"""The code location loads without torch: models (and torch) are imported only where a model runs."""

import subprocess
import sys

import adapters
from adapters.specs import SPECS


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_code_location_and_specs_load_without_torch():
    mods = _modules_after("import rs_embed_assets.definitions, adapters\n"
                          "[adapters.get_spec(m) for m in adapters.list_models()]")
    heavy = sorted(m for m in mods if m.split(".")[0] in {"torch", "timm", "torchvision", "transformers"})
    assert not heavy, f"the code location imported {heavy[:5]}"
    assert not any(m in mods for m in ("adapters.base", "adapters.fomo", "adapters.agrifm", "adapters.checkpoints"))


# Libraries only steps need. Every run worker (and, with the multiprocess executor, every step process)
# imports the code location before its first step, so each of these at module level would be paid by
# every run before STEP_START (benchmarks/bench_backfill.py --skip-plan; README "run overhead").
# numpy and pyarrow stay: the embedding assets' column schema is the pyarrow schema that writes the
# vectors, and their code version hashes the embedding module.
STEP_ONLY = {"xarray", "pandas", "duckdb", "zarr", "numcodecs", "pyproj", "shapely", "rasterio", "pystac",
             "pystac_client", "PIL", "geopandas", "polars", "faiss", "scipy", "dask", "stac_geoparquet"}
STEP_ONLY_OWN = {"rs_embed_assets.materialize", "rs_embed_assets.catalog", "rs_embed_assets.search",
                 "rs_embed_assets.stac_catalog", "rs_embed_assets.checks", "rs_embed_assets.providers.sample",
                 "rs_embed_assets.providers.local", "rs_embed_assets.providers.gee", "rs_embed_assets.providers.stac"}


def test_code_location_loads_without_the_libraries_only_steps_need():
    mods = _modules_after("import rs_embed_assets.definitions")
    loaded = sorted(m for m in mods if m.split(".")[0] in STEP_ONLY)
    assert not loaded, f"the code location imported {sorted({m.split('.')[0] for m in loaded})}: import them where used"
    assert not mods & STEP_ONLY_OWN, f"the code location imported {sorted(mods & STEP_ONLY_OWN)}"


def test_names_moved_out_of_module_level_still_import_from_where_they_were():
    from rs_embed_assets import materialize, resources, settings

    assert resources.KnobError is materialize.KnobError
    assert resources.EmbeddingSettings is materialize.EmbeddingSettings
    assert materialize.checkpoint_ids is settings.checkpoint_ids


def test_every_adapter_uses_the_spec_the_registry_serves():
    for model_id in adapters.list_models():
        cls = adapters.get_adapter_class(model_id)
        assert cls.spec is SPECS[model_id] is adapters.get_spec(model_id)


def test_configured_frames_follow_the_models_environment_variable(monkeypatch):
    monkeypatch.setenv("RS_EMBED_AGRIFM_FRAMES", "4")
    assert adapters.get_spec("agrifm").configured_frames() == 4
    assert adapters.get_spec("fomo").configured_frames() == 1
