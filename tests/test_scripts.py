"""Every script in scripts/ answers --help, is listed in docs/benchmarks.md, and the one that
writes the shipped model does so from a real run (into a temporary folder)."""

import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
# collect_photos.py reads sys.argv by hand (its --help rewrites the manifest): to be given argparse
# with the photo sets' move out of the tree. Strict, so this line goes once it has.
NO_HELP_YET = {"collect_photos.py"}


@pytest.mark.parametrize("script", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="no --help yet"))
                                    if p.name in NO_HELP_YET else p for p in SCRIPTS], ids=[p.name for p in SCRIPTS])
def test_script_answers_help(script, monkeypatch):
    """In this process (torch is imported already), so the whole set costs about a second."""
    if script.name in NO_HELP_YET:
        raise AssertionError(f"{script.name} has no --help")   # not run: see NO_HELP_YET
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code in (0, None) and "usage:" in out.getvalue()


def test_every_script_is_documented_in_one_line():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    listed = {p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    assert not [name for name in listed if f"`scripts/{name}`" not in doc]


def test_ship_model_writes_the_model_and_its_card(tiny_run, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(tiny_run), "--assets", str(tmp_path),
                        "--command", "fmnist train --preset seed --epochs 2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "MODEL_CARD.md").read_text()
    test_acc = json.loads((tiny_run / "metrics.json").read_text())["test_acc"]
    assert f"**test accuracy: {test_acc:.4f}**" in card and "`fmnist train --preset seed --epochs 2`" in card
    from fmnist.predict import Predictor

    p = Predictor(tmp_path / "default.pt")
    assert p.meta["metrics"]["test_acc"] == test_acc and 0 < p.threshold < 1
