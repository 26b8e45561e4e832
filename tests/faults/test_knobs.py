"""Every numeric knob is validated: a bad value fails early with a message naming the knob and the fix."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rs_embed_assets.assets.embeddings import build_embedding_asset
from rs_embed_assets.partitions import TILES, make_key
from rs_embed_assets.resources import KnobError, ModelResource, StorageResource

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch_size": -1}, "batch size -1"),
    ({"min_valid_fraction": 1.5}, "min_valid_fraction=1.5 must lie in [0, 1]"),
    ({"min_valid_fraction": -0.1}, "must lie in [0, 1]"),
    ({"pooling": "median"}, "pooling='median' is not supported"),
    ({"dtype": "float8"}, "RS_EMBED_DTYPE"),
    ({"device": "gpu0"}, "RS_EMBED_DEVICE"),
])
def test_bad_model_knobs_are_refused_by_name(kwargs, fragment):
    with pytest.raises(KnobError) as info:
        ModelResource(model_id="fomo", **kwargs).settings()
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 1}, {"min_valid_fraction": 0.0},
                                    {"min_valid_fraction": 1.0}, {"device": "cuda:1"}, {"dtype": "bf16"}])
def test_edge_values_are_accepted(kwargs):
    ModelResource(model_id="fomo", **kwargs).validate()


def test_negative_batch_size_from_the_environment_fails_the_run_before_any_chip(tmp_path):
    """The issue's reproduction: RS_EMBED_BATCH_SIZE=-1 embedded nothing and wrote 16 zero vectors."""
    out = _python("from rs_embed_assets.resources import ModelResource; ModelResource(model_id='fomo').settings()",
                  RS_EMBED_BATCH_SIZE="-1")
    assert out.returncode != 0
    assert "batch size -1 (RS_EMBED_BATCH_SIZE" in out.stderr and ">= 1, or 0" in out.stderr


def test_a_run_with_a_bad_knob_fails_at_resource_setup(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TILES.name, ["31UFU-k36-r21-c12"])
    result = dg.materialize([build_embedding_asset("fomo")], instance=instance, raise_on_error=False,
                            partition_key=str(make_key("31UFU-k36-r21-c12", "2024-06")),
                            resources={"storage": StorageResource(root=str(tmp_path)),
                                       "model_fomo": ModelResource(model_id="fomo", batch_size=-1)})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    assert "batch size -1" in str(failure.event_specific_data.error.cause or failure.event_specific_data.error)


def test_bad_start_month_names_the_variable_without_a_traceback(tmp_path):
    cli = subprocess.run([sys.executable, "-m", "rs_embed_assets.cli", "tiles", "add", "31UFU"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RS_EMBED_ASSETS_START_MONTH": "2024-13",
                              "DAGSTER_HOME": str(tmp_path / "home")})
    assert cli.returncode == 2, cli.stderr
    assert "RS_EMBED_ASSETS_START_MONTH='2024-13' is not a month; set it to YYYY-MM" in cli.stderr
    assert "Traceback" not in cli.stderr
