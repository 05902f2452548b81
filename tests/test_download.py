"""The download path against real HTTP servers on loopback: good, corrupt and dropping mirrors."""

import hashlib
import http.server
import threading

import numpy as np
import pytest

from conftest import idx_bytes
import gzip
from fmnist import data
from fmnist.data import DataError, IdxFile

LABELS = np.arange(10, dtype=np.uint8)
PAYLOAD = gzip.compress(idx_bytes(LABELS, "labels"))
SPEC = IdxFile("tiny-labels-idx1-ubyte", "labels", 10, hashlib.sha256(idx_bytes(LABELS, "labels")).hexdigest())


class Handler(http.server.BaseHTTPRequestHandler):
    mode = "good"
    hits: list

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.hits.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if self.mode == "files":
            body = (self.server.root / name).read_bytes() if (self.server.root / name).exists() else None
            if body is None:
                self.send_error(404)
                return
        elif self.mode == "bomb":  # 8 MiB of zeros after a valid header, gzipped to ~8 kB
            body = gzip.compress(idx_bytes(LABELS, "labels") + bytes(8 << 20))
        elif self.mode == "huge":  # a body far larger than any gzip of the expected file can be
            body = bytes(4 << 20)
        elif self.mode == "corrupt":  # valid gzip of a different IDX file: only the checksum catches it
            body = gzip.compress(idx_bytes(LABELS[::-1].copy(), "labels"))
        else:
            body = PAYLOAD
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.mode == "drop":  # promise the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    servers = []

    def start(mode, root=None):
        handler = type("H", (Handler,), {"mode": mode, "hits": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.root = root
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/data/", handler.hits

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_good(server, tmp_path):
    url, hits = server("good")
    p = data.fetch_file(SPEC, tmp_path, mirrors=[url])
    assert p.read_bytes() == PAYLOAD and hits == ["/data/tiny-labels-idx1-ubyte.gz"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tiny-labels-idx1-ubyte.gz"]


def test_corrupt_mirror_falls_back_to_next(server, tmp_path):
    bad, bad_hits = server("corrupt")
    good, _ = server("good")
    p = data.fetch_file(SPEC, tmp_path, mirrors=[bad, good])
    assert data.read_idx(p, "labels", 10, SPEC.sha256).tolist() == LABELS.tolist()
    assert len(bad_hits) == 1  # a checksum mismatch is not retried on the same mirror


def test_dropped_connection_is_retried_then_fails_cleanly(server, tmp_path):
    drop, hits = server("drop")
    with pytest.raises(DataError, match="could not download tiny-labels-idx1-ubyte.gz") as e:
        data.fetch_file(SPEC, tmp_path, mirrors=[drop], retries=3, timeout=5)
    assert len(hits) == 3
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_unreachable_mirror(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        data.fetch_file(SPEC, tmp_path, mirrors=["http://127.0.0.1:9/"], retries=1, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_full_dataset_download_into_cache(server, tmp_path, monkeypatch, dataset):
    """locate() with nothing local downloads the real files from a loopback mirror and verifies them."""
    url, hits = server("files", root=dataset.root)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(data, "MIRRORS", (url,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    root = data.locate(None)
    assert root == tmp_path / "cache" / "fmnist" and len(hits) == 4
    arrays = data.load_arrays(root)
    assert arrays["train-images"].shape == (60000, 28, 28)


@pytest.mark.parametrize("mode", ["bomb", "huge"])
def test_oversized_content_is_refused_and_not_retried(server, tmp_path, mode):
    bad, bad_hits = server(mode)
    good, _ = server("good")
    p = data.fetch_file(SPEC, tmp_path, mirrors=[bad, good])
    assert p.read_bytes() == PAYLOAD
    assert len(bad_hits) == 1  # wrong bytes from a mirror will not fix themselves: next mirror
    with pytest.raises(DataError, match="more than") as e:
        data.fetch_file(SPEC, tmp_path / "only-bad", mirrors=[bad])
    assert "could not download" in str(e.value)
    assert not any((tmp_path / "only-bad").iterdir())


def test_data_download_fetches_a_corrupt_cached_file_again(server, tmp_path, monkeypatch, dataset, cli):
    """The fix every verification error names (`fmnist data --download`) must fix a corrupt
    cached file, not stop at the same error."""
    url, hits = server("files", root=dataset.root)
    cache = tmp_path / "cache" / "fmnist"
    cache.mkdir(parents=True)
    for spec in data.FILES.values():
        (cache / (spec.stem + ".gz")).symlink_to(data.find_file(dataset.root, spec.stem))
    bad = cache / "t10k-labels-idx1-ubyte.gz"
    bad.unlink()
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(10_000, np.uint8), "labels")))  # right shape, wrong labels
    monkeypatch.setattr(data, "MIRRORS", (url,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = cli("data", "--download")
    assert r.returncode == 0, r.stderr
    assert hits == ["/data/t10k-labels-idx1-ubyte.gz"]  # that file alone, once
    assert f"{bad} does not verify" in r.stderr and "verified" in r.stdout
    assert bad.read_bytes() == (dataset.root / "t10k-labels-idx1-ubyte.gz").read_bytes()
