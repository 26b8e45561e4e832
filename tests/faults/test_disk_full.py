"""Disk full during a composite write: the error names the store and the fix; nothing is left behind.

Needs a real full filesystem: a 300 KiB tmpfs (mounting needs privileges; skipped where refused).
"""

import subprocess

import pytest

from rs_embed_assets.materialize import materialize_composite
from rs_embed_assets.providers import create_provider
from rs_embed_assets.storage import Storage, StorageError


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_names_the_store_and_keeps_the_root_clean(tiny_fs):
    st = Storage(tiny_fs / "data")
    with pytest.raises(StorageError) as info:
        materialize_composite(st, create_provider("sample"), "s2", "31UFU-k36-r21-c12", "2024-06")
    msg = str(info.value)
    assert "No space left on device" in msg and str(st.root / ".staging") in msg and "check free space" in msg
    assert st.composite_record("s2", "31UFU-k36-r21-c12", "2024-06") is None
    assert not any((st.root / ".staging").iterdir()), "the failed write removed its staging files"
