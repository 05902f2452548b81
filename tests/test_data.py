import gzip
import hashlib

import numpy as np
import pytest

from conftest import idx_bytes, write_idx
from fmnist import data
from fmnist.data import DataError, parse_idx, read_idx

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
LABELS = np.array([0, 3, 9, 1, 2], dtype=np.uint8)


def test_parse_valid_images_and_labels():
    assert np.array_equal(parse_idx(idx_bytes(IMAGES, "images"), "images", 5), IMAGES)
    assert np.array_equal(parse_idx(idx_bytes(LABELS, "labels"), "labels", 5), LABELS)


@pytest.mark.parametrize("gz", [True, False])
def test_read_gzip_or_raw(tmp_path, gz):
    p = write_idx(tmp_path / "x", IMAGES, "images", gz=gz)
    assert np.array_equal(read_idx(p, "images", 5), IMAGES)


def test_bad_magic():
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(idx_bytes(IMAGES, "images"), "labels", 5)


def test_truncated():
    with pytest.raises(DataError, match="truncated"):
        parse_idx(idx_bytes(IMAGES, "images")[:-10], "images", 5)


def test_trailing_bytes():
    with pytest.raises(DataError, match="trailing"):
        parse_idx(idx_bytes(IMAGES, "images") + b"\0", "images", 5)


def test_header_too_short():
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00\x08", "images", 5)


def test_wrong_count():
    with pytest.raises(DataError, match="header says 5 items, expected 60000"):
        parse_idx(idx_bytes(IMAGES, "images"), "images", 60000)


def test_wrong_image_size():
    with pytest.raises(DataError, match="expected 28x28"):
        parse_idx(idx_bytes(np.zeros((2, 32, 32), np.uint8), "images"), "images", 2)


def test_label_out_of_range():
    with pytest.raises(DataError, match="out of range"):
        parse_idx(idx_bytes(np.array([0, 10], np.uint8), "labels"), "labels", 2)


def test_checksum_mismatch_names_file(tmp_path):
    p = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", LABELS, "labels")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        read_idx(p, "labels", 5, sha256="0" * 64)
    good = hashlib.sha256(idx_bytes(LABELS, "labels")).hexdigest()
    assert len(read_idx(p, "labels", 5, sha256=good)) == 5  # checksum is of the decompressed bytes


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(IMAGES, "images"))[:-20])
    with pytest.raises(DataError, match="gzip stream is corrupt or truncated"):
        read_idx(p, "images", 5)


def test_real_files_verify(dataset):
    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert data.class_counts(dataset.train_labels) == [6000] * 10


def _fake_set(d, corrupt=None):
    """Four tiny files under the canonical names (checksums won't match; locate() doesn't read)."""
    d.mkdir(parents=True, exist_ok=True)
    for spec in data.FILES.values():
        arr = IMAGES if spec.kind == "images" else LABELS
        write_idx(d / (spec.stem + ".gz"), arr, spec.kind)
    return d


def test_locate_order(tmp_path, monkeypatch):
    a, b, deb, cache = (tmp_path / n for n in ("a", "b", "deb", "cache"))
    monkeypatch.setattr(data, "DEBIAN_DIR", deb)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    _fake_set(cache / "fmnist")
    assert data.locate(None, download=False) == cache / "fmnist"
    _fake_set(deb)
    assert data.locate(None, download=False) == deb
    _fake_set(b)
    monkeypatch.setenv("FMNIST_DATA", str(b))
    assert data.locate(None, download=False) == b
    _fake_set(a)
    assert data.locate(a, download=False) == a


def test_locate_nothing_and_no_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    with pytest.raises(DataError, match="fmnist data --download"):
        data.locate(None, download=False)


def test_corrupt_file_in_found_dir_is_an_error_not_a_fallback(tmp_path):
    d = _fake_set(tmp_path / "d")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        data.load_arrays(d)


def test_stratified_split():
    labels = __import__("torch").arange(10).repeat(100)
    tr, va = data.stratified_split(labels, 0.1, seed=1)
    assert len(va) == 100 and len(tr) == 900
    assert data.class_counts(labels[va]) == [10] * 10
    assert set(tr.tolist()).isdisjoint(va.tolist())
    tr2, va2 = data.stratified_split(labels, 0.1, seed=1)
    assert va.equal(va2)
    _, va3 = data.stratified_split(labels, 0.1, seed=2)
    assert not va.equal(va3)


# ---------------------------------------------------------------------------- a place the user named

def _refusing_mirror():
    """An http URL on loopback where nothing listens: a download attempt fails fast, never reaches out."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def fallbacks(tmp_path, monkeypatch):
    """A complete (fake) Debian copy and an empty cache: what an explicit place must not fall back to."""
    deb = _fake_set(tmp_path / "deb")
    monkeypatch.setattr(data, "DEBIAN_DIR", deb)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    return tmp_path / "cache" / "fmnist"


def test_explicit_data_dir_missing_a_file_is_an_error_naming_it(tmp_path, fallbacks):
    partial = _fake_set(tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        data.locate(partial, download=True, mirrors=[_refusing_mirror()])
    msg = str(e.value)
    assert "--data-dir" in msg and str(partial) in msg and "t10k-labels-idx1-ubyte" in msg
    assert "train-images" not in msg  # only what is missing is named
    assert not fallbacks.exists()  # nothing downloaded in its place


def test_explicit_data_dir_that_does_not_exist(tmp_path, fallbacks):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"--data-dir .*nope.*does not exist"):
        data.locate(missing, download=True, mirrors=[_refusing_mirror()])
    assert not fallbacks.exists() and not missing.exists()


def test_explicit_data_dir_that_is_a_file(tmp_path, fallbacks):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        data.locate(f, download=False)


def test_fmnist_data_env_missing_files_is_an_error(tmp_path, fallbacks, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FMNIST_DATA", str(empty))
    with pytest.raises(DataError) as e:
        data.locate(None, download=True, mirrors=[_refusing_mirror()])
    msg = str(e.value)
    assert "$FMNIST_DATA" in msg and all(s.stem in msg for s in data.FILES.values())
    assert not fallbacks.exists()


def test_data_dir_wins_over_env(tmp_path, fallbacks, monkeypatch):
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path / "does-not-exist"))
    d = _fake_set(tmp_path / "d")
    assert data.locate(d, download=False) == d  # --data-dir is used; the broken $FMNIST_DATA is not consulted


# ---------------------------------------------------------------------------- bounded reads

BOMB_CHECK = """
import resource, sys, time
from fmnist import data
spec = data.FILES["t10k-labels"]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    data.read_idx(sys.argv[1], spec.kind, spec.count, spec.sha256)
    print("accepted")
except data.DataError as e:
    print("refused:", e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # peak RSS growth, MiB
print(time.perf_counter() - t)
"""


def test_gzip_bomb_is_refused_without_expanding_it(tmp_path):
    """A ~1 MB .gz that expands to 256 MiB, under the name of a 10 kB file: refused after ~10 kB."""
    import subprocess
    import sys

    bomb = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        f.write(idx_bytes(np.zeros(10_000, np.uint8), "labels"))  # a plausible start
        for _ in range(256):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 4 << 20
    r = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(bomb)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    verdict, rss_mib, seconds = r.stdout.strip().splitlines()
    assert verdict.startswith("refused:") and str(bomb) in verdict and "more than 10,008 bytes" in verdict, verdict
    assert float(rss_mib) < 32, f"peak RSS grew {rss_mib} MiB reading a bomb"
    assert float(seconds) < 5


def test_raw_file_too_large_is_refused_by_its_size(tmp_path):
    p = tmp_path / "t10k-labels-idx1-ubyte"
    with open(p, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that takes no disk; read whole it would take 1 GiB of RAM
    with pytest.raises(DataError, match="more than 10,008 bytes"):
        read_idx(p, "labels", 10_000)


def test_read_checks_sha256_of_the_decompressed_stream(tmp_path):
    big = rng.integers(0, 256, (3000, 28, 28), dtype=np.uint8)  # > one read chunk
    p = write_idx(tmp_path / "x.gz", big, "images")
    good = hashlib.sha256(idx_bytes(big, "images")).hexdigest()
    assert np.array_equal(read_idx(p, "images", 3000, sha256=good), big)
    assert np.array_equal(read_idx(p, "images"), big)  # no count given: still read, under the largest file's size


def test_a_process_reads_and_verifies_unchanged_files_once(tmp_path, dataset, monkeypatch):
    """`fmnist train` loads the dataset to train and again to report: the second load reuses the
    verified files, hands out its own copies, and a file changed since is read (and refused) anew."""
    import shutil

    for spec in data.FILES.values():
        shutil.copy(data.find_file(dataset.root, spec.stem), tmp_path)
    reads = []
    real = data.read_idx
    monkeypatch.setattr(data, "read_idx", lambda path, *a, **k: reads.append(path.name) or real(path, *a, **k))
    first = data.load(tmp_path)
    first.train_images[0] = 0     # the caller's own copy
    second = data.load(tmp_path)
    assert len(reads) == 4 and second.train_images[0].equal(dataset.train_images[0])
    assert not second.train_images[0].equal(first.train_images[0])
    labels = data.find_file(tmp_path, data.FILES["t10k-labels"].stem)
    write_idx(labels, LABELS, "labels")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        data.load(tmp_path)
    assert len(reads) == 5
