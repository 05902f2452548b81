"""The milvus engine: a catalogue index whose vectors live in a Milvus collection, reached with the
client a cluster takes. A Milvus Lite server (`python -m milvus_lite server`) on a loopback port
plays the cluster, one per module; one test builds the default, a Milvus Lite file in DIR. The
vectors are the shared FAISS catalogue's (conftest.catalogue_index: 300 test images)."""

import json
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import CATALOGUE_ITEMS, needs
from test_search import photo_of, png_file
from test_serve import free_port, png, start_server

pytestmark = needs("faiss", "pymilvus", "milvus_lite")


def start_milvus(data_dir) -> tuple[subprocess.Popen, str]:
    """A Milvus Lite gRPC server in its own process on a free loopback port -> (process, URI)."""
    port = free_port()
    log = data_dir.parent / f"{data_dir.name}.log"   # a file, not a pipe nobody drains
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("Milvus Lite server exited: " + log.read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("Milvus Lite server did not listen in 60 s")


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    proc, uri = start_milvus(tmp_path_factory.mktemp("milvus-data"))
    yield uri
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def catalogue(catalogue_index):
    """The shared FAISS catalogue's vectors (exact copies: IndexHNSWFlat keeps them), items and thumbnails."""
    from fmnist.search.index import CatalogueIndex

    idx = CatalogueIndex.open(catalogue_index)
    (chunk,) = idx.chunks
    return SimpleNamespace(index=idx, vectors=idx.engine.index.reconstruct_n(0, len(idx)), items=idx.items(),
                           thumbs=np.load(catalogue_index / chunk.thumbs), model=idx.model)


def milvus_index(root, catalogue, uri, collection, split=250):
    """The catalogue in a milvus index: a build of the first `split` items, then an add of the rest."""
    from fmnist.search.index import CatalogueIndex

    idx = CatalogueIndex.create(root, catalogue.model, "milvus", engine_options={"uri": uri, "collection": collection})
    for a, b in ((0, split), (split, CATALOGUE_ITEMS)):
        idx.add(catalogue.vectors[a:b], catalogue.items[a:b], catalogue.thumbs[a:b], "fashion-mnist:test")
    return idx


def test_answers_as_exact_search_and_as_faiss(milvus, catalogue, tmp_path, monkeypatch):
    """Built and added to through a server's URI, reopened from DIR: every item as a query finds
    its exact 10 nearest (recall@10 >= 0.95) at distance 1 - cosine, as the FAISS index does. The
    token, read from the environment, is never written down."""
    from fmnist.search.index import CatalogueIndex, SearchIndexError

    monkeypatch.setenv("FMNIST_MILVUS_TOKEN", "root:s3cret-token")
    milvus_index(tmp_path / "idx", catalogue, milvus, "exact")
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert man["engine"]["name"] == "milvus" and man["vectors"] is None and man["count"] == CATALOGUE_ITEMS
    assert (man["engine"]["uri"], man["engine"]["collection"]) == (milvus, "exact")
    assert [c["count"] for c in man["chunks"]] == [250, 50] and not list((tmp_path / "idx").glob("vectors-*"))
    assert not any("s3cret" in f.read_text(errors="replace") for f in (tmp_path / "idx").iterdir())
    idx = CatalogueIndex.open(tmp_path / "idx")
    assert len(idx) == CATALOGUE_ITEMS and idx.engine_name == "milvus"
    v = catalogue.vectors
    found = idx.search(v, 10)
    ids = np.array([[n.id for n in row] for row in found])
    truth = np.argsort(-(v @ v.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= 0.95, recall
    dist = np.array([[n.distance for n in row] for row in found])
    assert np.allclose(dist, 1 - np.take_along_axis(v @ v.T, ids, 1), atol=1e-4)
    faiss_ids = np.array([[n.id for n in row] for row in catalogue.index.search(v, 10)])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, faiss_ids)]) >= 0.95
    assert found[7][0].source == "fashion-mnist:test#7" and found[7][0].label == catalogue.items[7]["label"]
    # a second index may not take over the collection
    with pytest.raises(SearchIndexError, match="already has a collection 'exact'.*--collection"):
        CatalogueIndex.create(tmp_path / "again", catalogue.model, "milvus",
                              engine_options={"uri": milvus, "collection": "exact"})


def test_cli_build_and_similar_default_milvus_lite_in_dir(cli, dataset, tmp_path):
    """`fmnist index build --engine milvus` with no URI: a Milvus Lite database in DIR, recorded
    relative to DIR; `fmnist similar` finds an item from its photo."""
    idx = tmp_path / "idx"
    r = cli("index", "build", "fashion-mnist:train", "--out", idx, "--engine", "milvus", "--limit", 12)
    assert r.returncode == 0 and "12 items (milvus" in r.stdout, r.stderr
    man = json.loads((idx / "manifest.json").read_text())
    assert (man["engine"]["uri"], man["engine"]["collection"]) == ("milvus.db", "fmnist_catalogue")
    assert (idx / "milvus.db").exists() and man["engine"]["server"].startswith("milvus_lite")
    r = cli("similar", photo_of(dataset, 9, tmp_path, "train"), "--index", idx, "-k", 2, "--json")
    assert json.loads(r.stdout)[0]["neighbours"][0]["source"] == "fashion-mnist:train#9", r.stderr


def test_rows_past_the_manifest_are_ignored_then_replaced(milvus, catalogue, tmp_path, caplog):
    """An add that inserted its rows but stopped before its manifest: an open index never returns
    them, and the next add deletes them before inserting its own."""
    from pymilvus import MilvusClient

    from fmnist.search.index import CatalogueIndex

    milvus_index(tmp_path / "idx", catalogue, milvus, "orphans", split=CATALOGUE_ITEMS - 10)
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    # the manifest as it was before the last add: its 10 rows are now past the count
    man["count"], man["chunks"] = CATALOGUE_ITEMS - 10, man["chunks"][:1]
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(man))
    idx = CatalogueIndex.open(tmp_path / "idx")
    assert len(idx) == CATALOGUE_ITEMS - 10 and "10 rows past the manifest" in caplog.text
    tail = catalogue.vectors[-10:]
    assert max(n.id for row in idx.search(tail, 5) for n in row) < CATALOGUE_ITEMS - 10
    idx.add(tail[::-1], catalogue.items[-10:][::-1], catalogue.thumbs[-10:][::-1], "fashion-mnist:test")
    client = MilvusClient(milvus)
    count = client.query("orphans", filter="", output_fields=["count(*)"], consistency_level="Strong")
    assert count[0]["count(*)"] == CATALOGUE_ITEMS == len(CatalogueIndex.open(tmp_path / "idx"))
    assert [row[0].id for row in idx.search(tail[::-1], 1)] == list(range(CATALOGUE_ITEMS - 10, CATALOGUE_ITEMS))


def test_a_missing_short_or_foreign_collection_is_a_clear_error(cli, milvus, catalogue, dataset, tmp_path):
    from pymilvus import MilvusClient

    milvus_index(tmp_path / "idx", catalogue, milvus, "damaged")
    photo = png_file(dataset, 0, tmp_path)

    def similar_error():
        r = cli("similar", photo, "--index", tmp_path / "idx")
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert f"Milvus at {milvus}" in r.stderr and "fmnist index build" in r.stderr, r.stderr
        return r.stderr

    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    more = {**man, "count": 301, "chunks": [man["chunks"][0], {**man["chunks"][1], "count": 51}]}
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(more))
    assert "holds 300 vectors, the manifest says 301" in similar_error()
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(man))
    client = MilvusClient(milvus)
    client.drop_collection("damaged")
    assert "has no collection 'damaged'" in similar_error()
    # another index built into a collection of the same name: not this catalogue's rows
    milvus_index(tmp_path / "other", catalogue, milvus, "damaged")
    assert "holds another catalogue" in similar_error()


def test_an_unreachable_server_or_a_uri_with_credentials_is_a_clear_error(catalogue, tmp_path):
    """Before any embedding (build_index creates the index first)."""
    from fmnist.search.index import CatalogueIndex, SearchIndexError

    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SearchIndexError, match=f"Milvus at {closed} cannot be reached"):
        CatalogueIndex.create(tmp_path / "idx", catalogue.model, "milvus", engine_options={"uri": closed})
    with pytest.raises(SearchIndexError, match="may not hold credentials") as e:
        CatalogueIndex.create(tmp_path / "idx", catalogue.model, "milvus",
                              engine_options={"uri": "http://root:pw@127.0.0.1:19530"})
    assert "pw" not in str(e.value)


def test_serve_with_a_milvus_index(catalogue, dataset, tmp_path, cli):
    """POST /v1/similar answers from the collection; when the server goes away, 503 naming it,
    and a new `fmnist serve --index` refuses to start with one line."""
    proc, uri = start_milvus(tmp_path / "milvus-data")
    try:
        milvus_index(tmp_path / "idx", catalogue, uri, "served")
        server, url = start_server("--index", str(tmp_path / "idx"))
        try:
            assert httpx.get(url + "/v1/index").json()["engine"] == "milvus"
            files = {"files": ("t.png", png(dataset.test_images[4].numpy()), "image/png")}
            r = httpx.post(url + "/v1/similar", files=files, params={"k": 3})
            assert r.status_code == 200 and r.json()["results"][0]["neighbours"][0]["id"] == 4, r.text
            proc.terminate()
            proc.wait(10)
            r = httpx.post(url + "/v1/similar", files=files, params={"k": 3}, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "index_unavailable", r.text
            assert f"Milvus at {uri}" in r.text and "Traceback" not in r.text
        finally:
            server.terminate()
            server.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
    r = cli("serve", "--port", 0, "--index", tmp_path / "idx")
    assert r.returncode == 1 and f"Milvus at {uri} cannot be reached" in r.stderr and "Traceback" not in r.stderr
