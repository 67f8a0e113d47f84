"""Every test of tests/test_fuse.py again, on the pyfuse3 + trio engine (``vdisk mount
--engine pyfuse3``): the kernel engine is the default, pyfuse3 stays supported with
the same handlers.  The tests are imported, not copied; after each one, a check fails
it if any mount it made used another engine."""

from __future__ import annotations

import pytest
import test_fuse as _tf
from test_fuse import rig  # noqa: F401  (the fixture the imported tests use)

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def pyfuse3_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("VDISK_FUSE_ENGINE", "pyfuse3")
    yield
    for log in tmp_path.rglob("*.log"):
        text = log.read_text(errors="replace")
        assert "engine kernel" not in text, f"{log} shows a kernel-engine mount"


for _name in dir(_tf):
    if _name.startswith("test_") and callable(getattr(_tf, _name)):
        globals()[_name] = getattr(_tf, _name)
