"""Visual search: embeddings, the catalogue index on disk, `fmnist index` / `fmnist similar`, and
POST /v1/similar against a real server. The catalogue: 300 test images (conftest.catalogue_index)."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from conftest import CATALOGUE_ITEMS
from fmnist.models import checkpoint
from fmnist.classes import CLASS_NAMES
from fmnist.photos import render_product_photo
from fmnist.inference.predict import default_checkpoint
from test_serve import png, start_server

pytest.importorskip("faiss")


def photo_of(dataset, i: int, tmp_path, split: str = "test"):
    """Test (or training) image i rendered as a product photo, as a JPEG file."""
    images = dataset.test_images if split == "test" else dataset.train_images
    f = tmp_path / f"{split}-{i}.jpg"
    f.write_bytes(render_product_photo(images[i].numpy(), np.random.default_rng(i)))
    return f


def test_embedding_is_unit_length_and_model_specific(dataset):
    from fmnist.search.embed import Embedder

    e = Embedder()
    v = e.embed_images(dataset.test_images[:64])
    assert v.shape == (64, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # in batches or alone: the same vector (eval mode, no batch statistics)
    assert np.allclose(e.embed_images(dataset.test_images[5:6]), v[5:6], atol=1e-5)
    # the nearest other image is mostly of the same class (the model's features carry the class)
    sim = v @ v.T - 2 * np.eye(64)
    labels = dataset.test_labels[:64].numpy()
    assert (labels[sim.argmax(1)] == labels).mean() > 0.8


def test_similar_finds_the_item_from_its_photo(cli, catalogue_index, dataset, tmp_path):
    """A product photo of catalogue item 7 finds item 7 first; --json and --out work."""
    photo = photo_of(dataset, 7, tmp_path)
    r = cli("similar", photo, "--index", catalogue_index, "-k", 5, "--json", "--out", tmp_path / "n.png")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    assert len(res["neighbours"]) == 5 and res["neighbours"][0]["id"] == 7
    assert res["neighbours"][0]["source"] == "fashion-mnist:test#7"
    assert res["neighbours"][0]["label"] == CLASS_NAMES[int(dataset.test_labels[7])]
    dists = [n["distance"] for n in res["neighbours"]]
    assert dists == sorted(dists) and 0 <= dists[0] < 0.2
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli("similar", photo, "--index", catalogue_index, "-k", 3)
    assert table.returncode == 0 and "fashion-mnist:test#7" in table.stdout.splitlines()[2]


def test_add_extends_the_index_without_rebuilding(cli, catalogue_index, dataset, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(catalogue_index, idx)
    first = {f.name: f.read_bytes() for f in idx.iterdir() if f.name.startswith(("items-", "thumbs-"))}
    r = cli("index", "add", "fashion-mnist:train", "--index", idx, "--limit", 40)
    assert r.returncode == 0, r.stderr
    man = json.loads((idx / "manifest.json").read_text())
    assert man["count"] == CATALOGUE_ITEMS + 40 and man["sources"] == ["fashion-mnist:test", "fashion-mnist:train"]
    assert [c["count"] for c in man["chunks"]] == [CATALOGUE_ITEMS, 40]
    # the first chunk untouched; the old vectors file replaced by the new one
    assert {n: (idx / n).read_bytes() for n in first} == first
    assert sorted(f.name for f in idx.glob("vectors-*")) == [man["vectors"]]
    r = cli("similar", photo_of(dataset, 25, tmp_path, "train"), "--index", idx, "-k", 3, "--json")
    top = json.loads(r.stdout)[0]["neighbours"][0]
    assert (top["id"], top["source"]) == (CATALOGUE_ITEMS + 25, "fashion-mnist:train#25")
    # a build into an existing index is refused, pointing to `add`
    r = cli("index", "build", "fashion-mnist:test", "--out", idx, "--limit", 5)
    assert r.returncode == 1 and "already holds an index" in r.stderr and "fmnist index add" in r.stderr


def test_photo_folder_source_and_usearch_engine(cli, dataset, tmp_path):
    """A folder of photos with a manifest: labels from it, RGB thumbnails; the usearch engine
    answers as FAISS does; a photo that cannot be converted is skipped and said."""
    pytest.importorskip("usearch")
    shop = tmp_path / "shop"
    shop.mkdir()
    rows = ["file,label"]
    for i in range(6):
        photo_of(dataset, i, tmp_path).rename(shop / f"item{i}.jpg")
        rows.append(f"item{i}.jpg,{CLASS_NAMES[int(dataset.test_labels[i])]}")
    (shop / "manifest.csv").write_text("\n".join(rows) + "\n")
    (shop / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = cli("index", "build", shop, "--out", tmp_path / "idx", "--engine", "usearch")
    assert r.returncode == 0, r.stderr
    assert "6 items (usearch" in r.stdout and "skipped" in r.stderr and "broken.png" in r.stderr
    from fmnist.search.index import CatalogueIndex

    idx = CatalogueIndex.open(tmp_path / "idx")
    assert idx.thumbnail(0).shape == (64, 64, 3)
    r = cli("similar", png_file(dataset, 3, tmp_path), "--index", tmp_path / "idx", "-k", 2, "--json")
    top = json.loads(r.stdout)[0]["neighbours"]
    assert len(top) == 2 and top[0]["source"] == "shop/item3.jpg" and top[0]["label"] == CLASS_NAMES[
        int(dataset.test_labels[3])]


def png_file(dataset, i, tmp_path):
    f = tmp_path / f"t{i}.png"
    f.write_bytes(png(dataset.test_images[i].numpy()))
    return f


def other_model(tmp_path, change_weights: bool):
    """The shipped checkpoint with its weights changed, or with only its calibration changed."""
    ck = checkpoint.load(default_checkpoint())
    if change_weights:
        key = next(k for k, v in ck["state_dict"].items() if v.dtype == torch.float32)
        ck["state_dict"][key] = ck["state_dict"][key] * 1.01
    else:
        ck["calibration"] = {**ck["calibration"], "temperature": ck["calibration"]["temperature"] * 1.1}
    f = tmp_path / ("other.pt" if change_weights else "recalibrated.pt")
    torch.save(ck, f)
    return f


def test_an_index_of_another_model_is_refused(cli, catalogue_index, dataset, tmp_path):
    photo = png_file(dataset, 0, tmp_path)
    r = cli("similar", photo, "--index", catalogue_index, "--checkpoint", other_model(tmp_path, True))
    assert r.returncode == 1 and "built with another model" in r.stderr and "--checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("index", "add", "fashion-mnist:test", "--index", catalogue_index, "--limit", 2,
            "--checkpoint", other_model(tmp_path, True))
    assert r.returncode == 1 and "built with another model" in r.stderr
    # the same weights recalibrated: the same embeddings, so the index is accepted
    r = cli("similar", photo, "--index", catalogue_index, "--checkpoint", other_model(tmp_path, False))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage,message", [
    ("no_dir", "no index at"),
    ("no_manifest", "manifest.json is missing"),
    ("bad_json", "damaged"),
    ("no_vectors", "missing (the manifest names it)"),
    ("bad_vectors", "not a readable FAISS index"),
    ("wrong_count", "the manifest says"),
    ("no_thumbs", "missing (the manifest names it)"),
])
def test_a_missing_or_corrupt_index_is_a_clear_error(cli, catalogue_index, dataset, tmp_path, damage, message):
    idx = tmp_path / "idx"
    shutil.copytree(catalogue_index, idx)
    man = json.loads((idx / "manifest.json").read_text())
    if damage == "no_dir":
        idx = tmp_path / "nothing-here"
    elif damage == "no_manifest":
        (idx / "manifest.json").unlink()
    elif damage == "bad_json":
        (idx / "manifest.json").write_text('{"format": "fmnist-catalogue-index", "count": ')
    elif damage == "no_vectors":
        (idx / man["vectors"]).unlink()
    elif damage == "bad_vectors":
        (idx / man["vectors"]).write_bytes((idx / man["vectors"]).read_bytes()[:1000])
    elif damage == "wrong_count":
        (idx / "manifest.json").write_text(json.dumps({**man, "count": 301,
                                                        "chunks": [{**man["chunks"][0], "count": 301}]}))
    elif damage == "no_thumbs":
        (idx / man["chunks"][0]["thumbs"]).unlink()
    r = cli("similar", png_file(dataset, 0, tmp_path), "--index", idx)
    assert r.returncode == 1 and message in r.stderr and "fmnist index build" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def search_server(catalogue_index):
    proc, url = start_server("--index", str(catalogue_index), "--max-upload-mb", "2")
    yield url
    proc.terminate()
    proc.wait(10)


def test_similar_endpoint(search_server, dataset):
    info = httpx.get(search_server + "/v1/index").json()
    assert info == {"enabled": True, "count": CATALOGUE_ITEMS, "engine": "faiss", "sources": ["fashion-mnist:test"],
                    "model": "ensemble of 3 fast", "k_max": 32}
    photo = render_product_photo(dataset.test_images[11].numpy(), np.random.default_rng(11))
    files = [("files", ("p.jpg", photo, "image/jpeg")), ("files", ("t.png", png(dataset.test_images[4].numpy()),
                                                                   "image/png"))]
    r = httpx.post(search_server + "/v1/similar", files=files, params={"k": 4, "include_image": True})
    assert r.status_code == 200, r.text
    a, b = r.json()["results"]
    assert [n["id"] for n in a["neighbours"]][:1] == [11] and len(a["neighbours"]) == 4
    assert b["neighbours"][0]["id"] == 4 and b["neighbours"][0]["distance"] < 1e-4   # the image itself
    assert a["preprocessed"].startswith("data:image/png;base64,")
    # the raw-body form, as /v1/predict takes it
    raw = httpx.post(search_server + "/v1/similar", content=photo, headers={"content-type": "image/jpeg"},
                     params={"k": 4})
    assert [n["id"] for n in raw.json()["results"][0]["neighbours"]] == [n["id"] for n in a["neighbours"]]
    thumb = httpx.get(search_server + a["neighbours"][0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    from PIL import Image
    import io
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))), dataset.test_images[11].numpy())


@pytest.mark.parametrize("case,status,code", [
    ("k_zero", 422, "invalid_request"),
    ("k_too_big", 422, "invalid_request"),
    ("too_many_files", 413, "too_many_files"),
    ("empty", 400, "empty_file"),
    ("not_image", 415, "unsupported_media_type"),
    ("too_big", 413, "payload_too_large"),
    ("no_files", 415, "unsupported_media_type"),
])
def test_similar_endpoint_limits(search_server, case, status, code):
    import os

    ok = png(np.zeros((28, 28), np.uint8))
    params, files, kw = {}, {"files": ("a.png", ok, "image/png")}, {}
    if case == "k_zero":
        params = {"k": 0}
    elif case == "k_too_big":
        params = {"k": 33}
    elif case == "too_many_files":
        files = [("files", (f"{i}.png", ok, "image/png")) for i in range(17)]
    elif case == "empty":
        files = {"files": ("a.png", b"", "image/png")}
    elif case == "not_image":
        files = {"files": ("a.txt", b"hello", "text/plain")}
    elif case == "too_big":
        files = {"files": ("big.png", os.urandom(3 << 20), "image/png")}
    elif case == "no_files":
        files, kw = None, {"content": b"{}", "headers": {"content-type": "application/json"}}
    r = httpx.post(search_server + "/v1/similar", files=files, params=params, **kw)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert "Traceback" not in r.text


@pytest.mark.parametrize("path,status", [
    ("/v1/thumbnails/299", 200), ("/v1/thumbnails/300", 404), ("/v1/thumbnails/-1", 404),
    ("/v1/thumbnails/abc", 422), ("/v1/thumbnails/..%2Fmanifest.json", 404), ("/v1/thumbnails/../manifest.json", 404),
])
def test_thumbnails_only_by_id(search_server, path, status):
    r = httpx.get(search_server + path)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["code"] in ("not_found", "invalid_request")
        assert "fmnist-catalogue-index" not in r.text   # no file of the index is reachable by path


def test_serve_refuses_a_missing_index_or_one_of_another_model(cli, catalogue_index, tmp_path):
    """Checked before the server listens: one line, exit status 1, no traceback."""
    r = cli("serve", "--port", 0, "--index", catalogue_index, "--checkpoint", other_model(tmp_path, True))
    assert r.returncode == 1 and "built with another model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("serve", "--port", 0, "--index", tmp_path / "none")
    assert r.returncode == 1 and "no index at" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_search_doc_tables_match_the_committed_json():
    """docs/search.md's tables are what scripts/search_tables.py renders from bench/cpu/search.json."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "search_tables.py"),
                          str(root / "bench" / "cpu" / "search.json")], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    doc = (root / "docs" / "search.md").read_text()
    missing = [line for line in lines if line not in doc]
    assert len(lines) > 20 and not missing, missing[:3]
