"""Photo sets are data fetched by manifest: downloads from a loopback server (and a loopback
package index and Debian mirror), verification, a local copy, re-runs that download nothing, and
how a set's name is resolved. The shipped manifests are checked for what a download needs."""

import csv
import hashlib
import io
import re
import shutil
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.cli import main
from fmnist.photos import debpkg, sets


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
                if body is None or isinstance(body, int):   # an int: that HTTP error
                    h.send_error(body or 404)
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
        wheels = sets._Packages()
        try:
            data = sets.download_source(row, wheels)
        finally:
            wheels.close()
        assert data == photo and Image.open(io.BytesIO(sets.make_stored(data, recipe))).mode == "L"
    finally:
        server.shutdown()


def build_deb(tmp: Path, files: dict[str, bytes], compression: str = "xz", links: dict[str, str] | None = None,
              package: str = "demo-photos", version: str = "1.0-1") -> bytes:
    """A real binary package, as dpkg-deb builds it, holding `files` (path -> bytes) and `links`."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian's dpkg package)")
    root = tmp / f"root-{compression}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
                                             "Maintainer: Test <test@example.org>\nDescription: test photos\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    for path, target in (links or {}).items():
        (root / path).symlink_to(target)
    out = tmp / f"{package}_{version}_all-{compression}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def test_a_debian_package_file_source_is_fetched_from_a_mirror_pool_once_per_fetch(tmp_path, monkeypatch, capsys):
    """`deb:PACKAGE=VERSION/POOL_PATH#MEMBER`: the .deb comes from $FMNIST_DEBIAN_MIRROR/POOL_PATH (a
    loopback mirror here), once for all its rows; a missing member and a wrong hash are named."""
    cat = png(11, size=(320, 240))
    deb = build_deb(tmp_path, {"usr/share/backgrounds/cat.png": cat},
                    links={"usr/share/backgrounds/latest.png": "cat.png"})
    pool = "pool/main/d/demo-photos-src/demo-photos_1.0-1_all.deb"
    server = Files({f"/debian/{pool}": deb})
    monkeypatch.setenv(debpkg.MIRROR_ENV, server.url("/debian/"))
    src = f"deb:demo-photos=1.0-1/{pool}#usr/share/backgrounds/"
    recipe = "jpeg quality=90 max_side=128 resize=thumbnail"
    crop = recipe + " crop=100,50,260,210"
    rows = [("cat.jpg", "cat.png", sha(cat), recipe), ("cat-crop.jpg", "cat.png", sha(cat), crop),
            ("link.jpg", "latest.png", sha(cat), recipe), ("dog.jpg", "dog.png", sha(cat), recipe),
            ("wrong.jpg", "cat.png", "0" * 64, recipe)]
    man = tmp_path / "manifests" / "demo"
    man.mkdir(parents=True)
    with open(man / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sets.COLUMNS)
        w.writeheader()
        for file, member, source_sha, r in rows:
            w.writerow(dict(file=file, label="none", kind="animal", split="train",
                            sha256=sha(sets.make_stored(cat, r)), source=src + member, source_sha256=source_sha,
                            recipe=r, licence="CC0-1.0", author="test"))
    monkeypatch.setattr(sets, "MANIFESTS", tmp_path / "manifests")
    monkeypatch.setenv("FMNIST_PHOTOS", str(tmp_path / "cache"))
    try:
        assert main(["photos", "fetch", "demo"]) == 1
        out = capsys.readouterr().out
        assert "demo: 3 of 5 photos" in out
        assert "dog.jpg: demo-photos_1.0-1_all.deb has no file usr/share/backgrounds/dog.png" in out
        assert re.search(r"wrong\.jpg: .*does not match its source_sha256", out)
        assert server.hits == [f"/debian/{pool}"]            # one download for all five rows
        folder = tmp_path / "cache" / "demo"
        assert Image.open(folder / "cat.jpg").size == (128, 96)
        assert Image.open(folder / "cat-crop.jpg").size == (128, 128)   # the 160x160 box, scaled
        assert (folder / "link.jpg").read_bytes() == (folder / "cat.jpg").read_bytes()
        assert not (folder / "dog.jpg").exists() and not (folder / "wrong.jpg").exists()
    finally:
        server.shutdown()


def test_a_package_the_mirror_fails_to_serve_is_retried_then_given_up_for_the_other_rows(tmp_path, monkeypatch):
    pool = "pool/main/d/demo/demo-photos_1.0-1_all.deb"
    server = Files({f"/{pool}": 503})
    monkeypatch.setenv(debpkg.MIRROR_ENV, server.url(""))
    rows = [sets.Row(f"{c}.jpg", "none", "object", "train", "0" * 64, f"deb:demo-photos=1.0-1/{pool}#{c}.png",
                     "0" * 64, "copy") for c in "ab"]
    packages = sets._Packages()
    try:
        with pytest.raises(sets.PhotoSetError, match=r"a\.jpg: could not download .*HTTP 503.*HTTP 503"):
            sets.download_source(rows[0], packages, retries=2)     # a server error is tried again
        with pytest.raises(sets.PhotoSetError, match="HTTP 503"):
            sets.download_source(rows[1], packages, retries=1)
        assert len(server.hits) == debpkg.GIVE_UP
        with pytest.raises(sets.PhotoSetError, match=r"b\.jpg: demo-photos_1.0-1_all.deb: not downloaded after 3"):
            sets.download_source(rows[1], packages, retries=2)     # the package's other rows stop asking
        assert len(server.hits) == debpkg.GIVE_UP
    finally:
        packages.close()
        server.shutdown()


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_a_deb_member_is_read_whatever_the_compression_and_a_non_package_is_refused(tmp_path, compression):
    cat = png(12)
    deb = tmp_path / "p.deb"
    deb.write_bytes(build_deb(tmp_path, {"usr/share/x/cat.png": cat}, compression=compression))
    debpkg.unpack_data(deb, tmp_path / "data.tar")
    import tarfile

    with tarfile.open(tmp_path / "data.tar") as t:
        assert t.extractfile("./usr/share/x/cat.png").read() == cat
    deb.write_bytes(b"<html>not found</html>")
    with pytest.raises(debpkg.DebError, match="p.deb is not a Debian package"):
        debpkg.unpack_data(deb, tmp_path / "data.tar")
    with pytest.raises(debpkg.DebError, match="is not a file of demo-photos 2:1.0-1"):
        debpkg.parse("deb:demo-photos=2:1.0-1/pool/main/d/demo-photos/demo-photos_1.0-2_all.deb#a.png")
    assert debpkg.parse("deb:demo-photos=2:1.0-1/pool/main/d/demo/demo-photos_1.0-1_all.deb#a.png")["member"] == "a.png"


def test_a_crop_is_a_box_of_the_upright_source_cut_before_the_resize():
    a = np.zeros((100, 200, 3), np.uint8)
    a[20:60, 120:180] = (255, 0, 0)                  # a red box: the crop below is exactly it
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out = Image.open(io.BytesIO(sets.make_stored(buf.getvalue(), "jpeg quality=95 max_side=30 crop=120,20,180,60")))
    assert out.size == (30, 20)
    px = np.asarray(out).reshape(-1, 3).mean(0)
    assert px[0] > 240 and px[1] < 15 and px[2] < 15
    with pytest.raises(sets.PhotoSetError, match=r"crop=150,20,210,60 is not a box inside the 200x100 source"):
        sets.make_stored(buf.getvalue(), "jpeg crop=150,20,210,60")
    for bad in ("jpeg crop=1,2,3", "copy crop=0,0,1,1", "jpeg crop=0,0,-1,1"):
        with pytest.raises(sets.PhotoSetError, match="crop takes four whole numbers"):
            sets.parse_recipe(bad)


@pytest.mark.parametrize("name", sets.names())
def test_shipped_manifests_say_how_to_download_and_remake_every_photo(name):
    rows = sets.manifest(name)
    assert len({r.file for r in rows}) == len(rows)
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{64}", r.sha256) and re.fullmatch(r"[0-9a-f]{64}", r.source_sha256), r.file
        assert (re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/\S+", r.source)
                or sets.PYPI.fullmatch(r.source) or debpkg.SOURCE.fullmatch(r.source)), r.file
        sets.parse_recipe(r.recipe)
        assert r.licence and r.author, r.file
