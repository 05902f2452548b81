"""`fmnist bench accuracy`'s yardstick: one `seed` epoch timed in the same call, and every
time-to-accuracy also given as a multiple of it (seed epochs). Tiny sizes; no timing is judged."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist.bench import runner as bench

ROOT = Path(__file__).resolve().parent.parent
# what the runs validate and report on: 1,200 and 1,000 images, enough to see that they learned
SMALL_EVAL = {"val_fraction": 0.02, "test_subset": 1000}


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_accuracy_runs_report_times_in_seed_epochs(tmp_path, dataset, one_thread):
    ref = bench.seed_epoch("cpu", subset=512, warmup_steps=2)
    assert ref["images"] == 512 and ref["seconds"] > 0 and ref["device"] == "cpu" and "seed" in ref["workload"]
    acc = bench.accuracy_runs(["seed@1"], [0], tmp_path, overrides={"subset": 512, "device": "cpu", "threads": 1, **SMALL_EVAL},
                              reference=ref)
    (run,) = acc["seed@1"]["runs"]
    assert run["seed_epoch_seconds"] == ref["seconds"]
    assert run["wall_seed_epochs"] == pytest.approx(run["wall_seconds"] / ref["seconds"])
    assert set(run["time_to"]) == {"0.92", "0.93", "0.94", "0.95"}
    for k, v in run["time_to"].items():
        assert run["time_to_seed_epochs"][k] == (None if v is None else pytest.approx(v / ref["seconds"]))
    s = acc["seed@1"]["summary"]
    assert s["wall_seed_epochs_median"] == pytest.approx(run["wall_seed_epochs"])
    assert "time_to_0.95_median_seed_epochs" in s and run["final_test_acc"] > 0.3  # it learned (chance: 0.1)


def test_a_call_cut_off_mid_preset_keeps_the_seeds_it_finished(tmp_path, dataset, one_thread, monkeypatch,
                                                                    caplog):
    """A cut-off (Ctrl-C, a session's end) during a preset's second seed: the first seed's run is
    already on disk in accuracy_partial.json, so a long preset loses one run at most."""
    from fmnist.training import train as train_mod
    real_train, calls = train_mod.train, []

    def train_then_cut_off(cfg):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg)

    monkeypatch.setattr(train_mod, "train", train_then_cut_off)
    with pytest.raises(KeyboardInterrupt):
        bench.accuracy_runs(["seed@1"], [0, 1], tmp_path, overrides={"subset": 512, "device": "cpu", "threads": 1, **SMALL_EVAL})
    saved = json.loads((tmp_path / "accuracy_partial.json").read_text())
    assert calls == [0, 1] and [r["seed"] for r in saved["seed@1"]["runs"]] == [0]
    assert saved["seed@1"]["summary"]["n"] == 1 and saved["seed@1"]["runs"][0]["final_test_acc"] > 0.3
    assert "the 1 finished run(s) are in" in caplog.text and "accuracy_partial.json" in caplog.text


def _run(seed, wall, t93, ref, curve=None):
    r = {"seed": seed, "final_test_acc": 0.94, "wall_seconds": wall, "time_to": {"0.92": wall / 2, "0.93": t93}}
    if curve is not None:
        r["curve"] = curve
    return bench.in_seed_epochs({**r, "seed_epoch_seconds": ref}) if ref else r


def test_seed_epoch_medians_are_over_each_runs_own_reference():
    """Runs appended from two calls, the second on a machine twice as slow: each run is
    divided by its own call's seed epoch, so the same work reads the same in seed epochs."""
    runs = [_run(0, 100, 80, 10.0), _run(1, 200, 160, 20.0), _run(2, 210, None, 20.0)]
    s = bench._summarise(runs)
    assert s["wall_seed_epochs_median"] == 10.0 and s["wall_seconds_median"] == 200
    assert s["time_to_0.93_median_seed_epochs"] == 8.0 and s["time_to_0.93_reached"] == "2/3"
    assert "time_to_0.94_median" not in s  # older runs hold no 0.94/0.95: no figure rather than a wrong one
    # a run from before the reference existed: seconds only, for the whole preset
    assert "wall_seed_epochs_median" not in bench._summarise(runs + [_run(3, 90, 70, None)])


def test_append_fills_new_thresholds_from_the_curve():
    old_run = {"seed": 0, "final_test_acc": 0.951, "wall_seconds": 30.0, "curve": [(10.0, 0.93), (20.0, 0.945),
               (30.0, 0.951)], "time_to": {"0.92": 10.0, "0.93": 10.0, "0.94": 20.0}}
    merged = bench.merge_accuracy({"fast": {"runs": [old_run]}}, {})
    (run,) = merged["fast"]["runs"]
    assert run["time_to"]["0.95"] == 30.0 and merged["fast"]["summary"]["time_to_0.95_median"] == 30.0


def _tables(tmp_path, report) -> str:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "results_tables.py"), str(path)],
                          capture_output=True, text=True, check=True).stdout


def test_results_tables_show_seed_epochs_only_where_measured(tmp_path):
    old = json.loads((ROOT / "bench" / "cpu" / "training" / "bench.json").read_text())
    old_md = _tables(tmp_path, {"accuracy": old["accuracy"]})
    assert "to 95 %" not in old_md and "x (" not in old_md and "Reference workload" not in old_md
    runs = [_run(s, 100 + s, 80.0, 10.0, curve=[(50.0, 0.93), (100.0, 0.951)]) for s in range(3)]
    for r in runs:
        r["time_to"] = bench.time_to(r["curve"])
    report = {"reference": {"workload": bench.REFERENCE_WORKLOAD, "seconds": 10.0, "seconds_after": 11.0,
                            "device": "cpu", "threads": 2, "images": 54000},
              "accuracy": {"gpu": {"runs": [bench.in_seed_epochs(r) for r in runs]}}}
    report["accuracy"]["gpu"]["summary"] = bench._summarise(report["accuracy"]["gpu"]["runs"])
    md = _tables(tmp_path, report)
    assert "| to 92 % | to 93 % | to 94 % | to 95 % |" in md
    assert "| `gpu` | 3 | 94.00 % | 94.00 ± 0.00 | 101 = 10.1x | 50.0 s = 5.0x (3/3) |" in md
    assert "10.00 s at the start of the call, 11.00 s at its end" in md
