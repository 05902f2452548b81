"""scripts/dataset_png_check.py on a few images: every way and encoding measured, a sitting written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow   # a server and a CLI process of their own (~15 s); test_predict and test_serve cover the paths
def test_check_writes_every_way_and_encoding(tmp_path, dataset):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "pngs.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "dataset_png_check.py"), "--n", "6", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    doc = json.loads(out.read_text())
    assert len(doc["sittings"]) == 1 and doc["sittings"][0]["n"] == 6
    res = doc["sittings"][0]["results"]
    assert set(res) == {"cli", "api", "server"} and all(set(r) == {"L", "RGB", "RGBA", "P"} for r in res.values())
    assert all(r["unchanged"] == 1.0 and r["same_label_as_L"] == 1.0 for w in res.values() for r in w.values())
    assert doc["sittings"][-1]["one_label_from_all_twelve"] == 1.0
