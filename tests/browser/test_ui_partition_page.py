"""In a real browser: a composite partition's page in the Dagster UI shows its RGB quick-look.

The partition is materialised in-process into a scratch DAGSTER_HOME, then `dagster-webserver`
serves that instance on 127.0.0.1 and headless Chromium (Debian's `chromium`, driven by
Playwright) opens the asset's partition page. The screenshot lands in tests/artifacts/ (ignored by git).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from servers import free_port, reset_signals, stop_group

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RS_EMBED_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
CHROMIUM = os.environ.get("RS_EMBED_CHROMIUM", "/usr/bin/chromium")
TILE = "31UFU-k36-r21-c12"
PARTITION = f"2024-06-01|{TILE}"


@pytest.fixture
def served_partition(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`, "
                    "as .ci/run does)")
    import dagster as dg
    import requests

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "RS_EMBED_ASSETS_DATA_ROOT": str(tmp_path / "data"),
           "RS_EMBED_ASSETS_MODELS": "fomo", "RS_EMBED_FOMO_DEPTH": "2", "RS_EMBED_ALLOW_RANDOM_INIT": "1",
           "RS_EMBED_FOMO_AUTO_DOWNLOAD": "0", "RS_EMBED_DEVICE": "cpu"}
    from rs_embed_assets.assets.checkpoints import build_checkpoint_asset
    from rs_embed_assets.assets.composites import composite_assets
    from rs_embed_assets.assets.embeddings import build_embedding_asset
    from rs_embed_assets.resources import CheckpointPolicyResource, ModelResource, ProviderResource, StorageResource

    mp = pytest.MonkeyPatch()
    for name in ("RS_EMBED_FOMO_DEPTH", "RS_EMBED_FOMO_AUTO_DOWNLOAD"):
        mp.setenv(name, env[name])
    assets = [build_checkpoint_asset("fomo", "fomo"), *composite_assets, build_embedding_asset("fomo")]
    resources = {"storage": StorageResource(root=str(tmp_path / "data")), "provider": ProviderResource(kind="sample"),
                 "checkpoint_policy": CheckpointPolicyResource(allow_random_init=True),
                 "model_fomo": ModelResource(model_id="fomo", device="cpu", batch_size=8)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("tiles", [TILE])
        assert dg.materialize(assets, selection=[dg.AssetKey(["checkpoint", "fomo"])], instance=instance,
                              resources=resources).success
        assert dg.materialize(assets, selection=[dg.AssetKey("s2_composite"), dg.AssetKey("s1_composite"),
                                                 dg.AssetKey(["embeddings", "fomo"])],
                              partition_key=PARTITION, instance=instance, resources=resources).success
    mp.undo()
    port = free_port()
    log = open(tmp_path / "webserver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-w", str(REPO / "workspace.yaml"),
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=reset_signals, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "dagster-webserver did not come up in 90 s"
            time.sleep(0.5)
        yield base, tmp_path
    finally:
        stop_group(proc, log, 20)


def _open_preview(page, url: str, shot: Path):
    """Open a partition's page, open its `preview` Markdown and return the rendered data-URI image."""
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    img = page.locator('img[src^="data:image/png;base64,"]').first
    try:
        # the partition's own metadata; Markdown values open in a dialog ("Show Markdown")
        row = page.locator("tr", has=page.locator("td", has_text="preview")).last
        row.wait_for(timeout=60_000)
        try:  # a fresh browser profile gets the "Join the Dagster community" dialog first
            page.get_by_role("button", name="Skip").click(timeout=15_000)
        except Exception:  # noqa: BLE001 - no dialog this time
            pass
        row.get_by_text("Show Markdown").click()
        img.wait_for(state="attached", timeout=30_000)
    except Exception:
        page.screenshot(path=str(shot.with_name(shot.stem + "_failed.png")), full_page=True)
        raise
    img.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    page.screenshot(path=str(shot), full_page=True)
    return img


@pytest.mark.slow
def test_partition_pages_show_the_quicklook_and_the_embedding_pca(served_partition):
    from playwright.sync_api import sync_playwright

    base, _ = served_partition
    part = urllib.parse.quote(PARTITION)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            img = _open_preview(page, f"{base}/assets/s2_composite?view=partitions&partition={part}",
                                ARTIFACTS / "partition_page.png")
            assert min(img.evaluate("img => [img.naturalWidth, img.naturalHeight]")) >= 32
            assert "RGB" in (img.get_attribute("alt") or "")
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            img = _open_preview(page, f"{base}/assets/embeddings/fomo?view=partitions&partition={part}",
                                ARTIFACTS / "partition_page_embeddings.png")
            assert min(img.evaluate("img => [img.naturalWidth, img.naturalHeight]")) >= 64
            assert "PCA" in (img.get_attribute("alt") or "")
        finally:
            browser.close()
    assert (ARTIFACTS / "partition_page.png").stat().st_size > 10_000
