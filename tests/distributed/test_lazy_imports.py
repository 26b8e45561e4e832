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


def test_every_adapter_uses_the_spec_the_registry_serves():
    for model_id in adapters.list_models():
        cls = adapters.get_adapter_class(model_id)
        assert cls.spec is SPECS[model_id] is adapters.get_spec(model_id)


def test_configured_frames_follow_the_models_environment_variable(monkeypatch):
    monkeypatch.setenv("RS_EMBED_AGRIFM_FRAMES", "4")
    assert adapters.get_spec("agrifm").configured_frames() == 4
    assert adapters.get_spec("fomo").configured_frames() == 1
