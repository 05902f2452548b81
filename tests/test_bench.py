"""`fmnist bench --dry-run`: each part's whole code path at tiny sizes, through the command, and
what it writes is strict JSON (no Infinity/NaN, which json.dumps would write and JSON forbids)."""

import json

import pytest

from conftest import photo_dir
from fmnist.cli import main



def _strict(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def bench(tmp_path, *argv) -> dict:
    assert main(["bench", *argv, "--dry-run", "--out", str(tmp_path)]) == 0
    return _strict((tmp_path / "bench.json").read_text())


def test_throughput(tmp_path):
    r = bench(tmp_path, "throughput")["throughput"]
    assert r["matmul_peak_gflops"]["fp32"] > 0 and "compile" not in r
    for name, m in r["models"].items():
        assert m["params"] > 0 and m["train_mflop_per_image"] > m["infer_mflop_per_image"] > 0, name
        assert m["fp32"]["train_img_s"] > 0 and m["fp32"]["infer_img_s"] > 0, name


def test_accuracy(tmp_path, dataset):
    r = bench(tmp_path, "accuracy", "--presets", "seed", "--seeds", "1")["accuracy"]["seed"]
    (run,) = r["runs"]
    assert len(run["curve"]) == 1 and 0.3 < run["final_test_acc"] < 1  # one epoch on 500 images: above chance
    assert run["time_to"]["0.94"] is None and r["summary"]["time_to_0.94_median"] is None  # was Infinity
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0
    assert not (tmp_path / "accuracy_partial.json").exists()  # superseded by bench.json


def test_profile(tmp_path, dataset):
    r = bench(tmp_path, "profile")["profile"]
    assert r["steps"] == 2 and sum(k["share"] for k in r["kinds"].values()) == pytest.approx(1)
    assert "convolution" in r["kinds"]


def test_photos_with_real_photos(tmp_path, dataset):
    photo_dir("real")
    rep = bench(tmp_path, "photos", "--real", "real")
    p = rep["photos"]
    assert p["n"] == 50 and p["errors"] == 0 and p["acc_28x28"] > 0.85 and p["acc_photos"] > 0.6
    assert (tmp_path / "photo_pipeline.png").stat().st_size > 0
    real = rep["photos_real"]
    assert set(real["variants"]) == {"paper", "robust"}
    assert real["variants"]["robust"]["dev"]["n"] == 6 and real["test_acc_28x28"] > 0.85
    assert rep["conversion_speed"]["robust"]["median_ms"] > 0


def test_onnx(tmp_path, dataset):
    pytest.importorskip("onnxruntime")
    r = bench(tmp_path, "onnx")["onnx"]
    assert set(r["backends"]) == {"pytorch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8"}
    for name, b in r["backends"].items():
        assert b["test_acc"] > 0.85 and b["img_s_batch"] > 0 and b["latency_ms_p99"] >= b["latency_ms_p50"], name


def test_serve(tmp_path):
    """The serve part adds an entry to serve.json (earlier entries stay) instead of bench.json."""
    (tmp_path / "serve.json").write_text(json.dumps({"sittings": [{"an": "earlier sitting"}]}))
    assert main(["bench", "serve", "--dry-run", "--out", str(tmp_path)]) == 0
    doc = _strict((tmp_path / "serve.json").read_text())
    assert len(doc["sittings"]) == 2 and doc["sittings"][0] == {"an": "earlier sitting"}
    s = doc["sittings"][-1]
    assert set(s["settings"]) == {"torch"} and s["environment"]["torch"]
    for row in s["settings"]["torch"]["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0 and row["rps"] > 0, row
    assert s["settings"]["torch"]["soak"]["errors"] == 0


def test_search(tmp_path, dataset):
    """Every search part at tiny sizes: 1,000 training images, copies past them, 10 photos."""
    pytest.importorskip("faiss")
    pytest.importorskip("usearch")
    pytest.importorskip("milvus_lite")
    assert main(["bench", "search", "--dry-run", "--out", str(tmp_path)]) == 0
    r = _strict((tmp_path / "search.json").read_text())
    assert r["quality"]["embedding"]["precision_at_10"] > r["quality"]["baseline_pixels"]["precision_at_10"]
    assert 0 < r["augmentation_spread"]["mean_cosine_distance"] < 0.5
    assert set(r["engines"]["engines"]) == {"faiss", "usearch", "milvus"}
    m = r["engines"]["engines"]["milvus"]
    assert m["recall_at_10"] > 0.9 and m["one_query"]["n"] == 20 and m["server"].startswith("milvus_lite")
    (size,) = r["scale"].values()
    assert size["items"] == 1500 and size["real_items"] == 1000 and size["recall_at_10"] > 0.9
    assert size["copies"] == r["engines"]["copies"] == "embedded augmented copies"   # the default, --copies embedded
    assert size["memory_bytes"] > size["vectors_bytes"] and size["one_query_one_thread"]["cpu"]["p99_ms"] > 0


def test_search_engines_measured_again_join_the_entry():
    """--search-engines milvus after a run of all: milvus's row replaced (with its environment),
    the others kept; a run on another catalogue replaces the entry."""
    from fmnist.bench.search import merge_engines

    def entry(when, names, catalogue=100_000):
        return {"environment": {"time": when}, "model": {"weights_sha256": "ab"}, "catalogue": catalogue,
                "real_items": 60_000, "queries": 1000, "settings": {"M": 32},
                "engines": {n: {"recall_at_10": when} for n in names}}

    old = entry("t1", ["faiss", "usearch", "milvus"])
    merged = merge_engines(old, entry("t2", ["milvus"]))
    assert merged["environment"] == {"time": "t1"} and merged["engines"]["faiss"] == {"recall_at_10": "t1"}
    assert merged["engines"]["milvus"] == {"recall_at_10": "t2", "environment": {"time": "t2"}}
    assert old["engines"]["milvus"] == {"recall_at_10": "t1"}   # the old entry itself untouched
    assert merge_engines(old, entry("t2", ["milvus"], catalogue=10_000)) == entry("t2", ["milvus"], 10_000)
    assert merge_engines({}, entry("t2", ["milvus"])) == entry("t2", ["milvus"])
    assert merge_engines(old, entry("t3", ["faiss", "usearch", "milvus"]))["environment"] == {"time": "t3"}


def test_a_catalogue_past_the_training_images_holds_copies_in_order():
    """Items past the training images: copy 1 of each training image, then copy 2, ...; the
    embedded ones as the model embedded them, the moved ones unit vectors near their originals."""
    import numpy as np

    from fmnist.bench.search import catalogue_vectors

    train = np.eye(4, 8, dtype=np.float32)
    embedded = catalogue_vectors(train, 10, copies=lambda c: train * 0 + c)
    assert (embedded[:4] == train).all() and (embedded[4:8] == 1).all() and (embedded[8:] == 2).all()
    moved = catalogue_vectors(train, 10, spread=0.05)
    assert np.allclose(np.linalg.norm(moved, axis=1), 1) and (moved[4:8] * train).sum(1).min() > 0.5
