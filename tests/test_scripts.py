"""Every script in scripts/ answers --help and is listed in docs/benchmarks.md; the one that
writes the shipped model does so from a real run (into a temporary folder), and the one that
scores several models on the photo sets scores a real one."""

import json
from pathlib import Path

import pytest
import conftest
from conftest import photo_dir

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))


def run_script(monkeypatch, script: Path, *argv) -> str:
    """conftest.run_script, which must succeed -> what the script printed."""
    r = conftest.run_script(monkeypatch, script, *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_answers_help(script, monkeypatch):
    assert "usage:" in run_script(monkeypatch, script, "--help")


def test_every_script_is_documented_in_one_line():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    listed = {p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    assert not [name for name in listed if f"`scripts/{name}`" not in doc]


def test_ship_model_writes_the_model_and_its_card(tiny_run, tmp_path, monkeypatch):
    run_script(monkeypatch, ROOT / "scripts" / "ship_model.py", tiny_run, "--assets", tmp_path,
               "--command", "fmnist train --preset seed --epochs 2")
    card = (tmp_path / "MODEL_CARD.md").read_text()
    test_acc = json.loads((tiny_run / "metrics.json").read_text())["test_acc"]
    assert f"**test accuracy: {test_acc:.4f}**" in card and "`fmnist train --preset seed --epochs 2`" in card
    from fmnist.predict import Predictor

    p = Predictor(tmp_path / "default.pt")
    assert p.meta["metrics"]["test_acc"] == test_acc and 0 < p.threshold < 1


def test_photo_seed_check_scores_a_model_on_the_photo_sets(tiny_run, tmp_path, monkeypatch):
    for name in ("real", "nonclothing", "outliers"):
        photo_dir(name)
    out = tmp_path / "members.json"
    run_script(monkeypatch, ROOT / "scripts" / "photo_seed_check.py", "--out", out, "--model", f"tiny={tiny_run / 'best.pt'}")
    m = json.loads(out.read_text())["models"]["tiny"]
    assert m["n"] == 93 and 0 <= m["acc"] <= 1 and m["nonclothing_n"] == 36 and m["heldout_hats_n"] == 36
