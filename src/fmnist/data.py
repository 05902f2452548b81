"""Fashion-MNIST on disk: find, download, verify and parse the four IDX files.

Nothing here trains on data it has not verified: every file is checked against the
SHA-256 of its *decompressed* bytes (gzip wrappers differ between mirrors and Debian's
package, the content does not), and every header is checked before a byte is used.
Files and downloads are read in chunks, hashed as they stream, and cut off at the size
the expected file has, so a gzip bomb or an endless body costs kilobytes, not gigabytes.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import struct
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fmnist.utils.atomic import atomic_path
from fmnist.classes import CLASS_NAMES, IMAGE_SIZE

log = logging.getLogger(__name__)

class DataError(Exception):
    """A dataset file is missing, corrupt or unreachable; the message says what to do."""


@dataclass(frozen=True)
class IdxFile:
    stem: str  # canonical name without .gz
    kind: str  # "images" or "labels"
    count: int
    sha256: str  # of the decompressed bytes


FILES: dict[str, IdxFile] = {
    "train-images": IdxFile("train-images-idx3-ubyte", "images", 60_000,
                            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels": IdxFile("train-labels-idx1-ubyte", "labels", 60_000,
                            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images": IdxFile("t10k-images-idx3-ubyte", "images", 10_000,
                           "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels": IdxFile("t10k-labels-idx1-ubyte", "labels", 10_000,
                           "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}

# IDX magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
MAGIC = {"images": 0x00000803, "labels": 0x00000801}

MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FIX_HINT = "run `fmnist data --download` to fetch a fresh copy into the cache, or point --data-dir elsewhere"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist"


# ---------------------------------------------------------------------------- parsing

CHUNK = 1 << 20  # read and hash 1 MiB at a time: memory stays bounded by the expected size


def idx_size(kind: str, count: int) -> int:
    """Bytes of an IDX ubyte file: magic + one uint32 per dimension + the items."""
    dims = 3 if kind == "images" else 1
    return 4 + 4 * dims + count * (IMAGE_SIZE * IMAGE_SIZE if kind == "images" else 1)


# The largest file there is (train images, 47 MB): the cap when a caller gives no item count.
MAX_IDX_BYTES = max(idx_size(f.kind, f.count) for f in FILES.values())


def read_content(path: Path, limit: int = MAX_IDX_BYTES) -> tuple[bytearray, str]:
    """(content, SHA-256 hex) of a file, decompressed if it is gzip (decided by content, not name).

    Never more than limit + 1 bytes of content are produced: a small .gz that expands to
    gigabytes (a gzip bomb, from a mirror or a disk) is refused once it passes `limit`,
    and an oversized raw file by its size, before it is read."""
    path = Path(path)
    too_big = (f"{path}: content is more than {limit:,} bytes, the most the expected file holds; "
               f"it is the wrong file or corrupt; {FIX_HINT}")
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not gz and os.fstat(raw.fileno()).st_size > limit:
                raise DataError(too_big)
            src = gzip.GzipFile(fileobj=raw) if gz else raw
            data, digest = bytearray(), hashlib.sha256()
            while len(data) <= limit and (chunk := src.read(min(CHUNK, limit + 1 - len(data)))):
                data += chunk
                digest.update(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: gzip stream is corrupt or truncated ({e}); {FIX_HINT}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); {FIX_HINT}") from None
    if len(data) > limit:
        raise DataError(too_big)
    return data, digest.hexdigest()


def parse_idx(data: bytes, kind: str, expected_count: int | None, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX ubyte file: images -> (N, 28, 28) uint8, labels -> (N,) uint8."""
    want_dims = 3 if kind == "images" else 1
    header = 4 + 4 * want_dims
    if len(data) < header:
        raise DataError(f"{name}: only {len(data)} bytes, too short for an IDX {kind} header; {FIX_HINT}")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != MAGIC[kind]:
        raise DataError(f"{name}: bad magic number 0x{magic:08x}, expected 0x{MAGIC[kind]:08x} "
                        f"(IDX unsigned-byte {kind}); is this the right file? {FIX_HINT}")
    dims = struct.unpack(">" + "I" * want_dims, data[4:header])
    if kind == "images" and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}; {FIX_HINT}")
    if expected_count is not None and dims[0] != expected_count:
        raise DataError(f"{name}: header says {dims[0]} items, expected {expected_count}; {FIX_HINT}")
    n_bytes = int(np.prod(dims))
    body = len(data) - header
    if body != n_bytes:
        what = "truncated" if body < n_bytes else "has trailing bytes"
        raise DataError(f"{name}: {what}: {body} data bytes, header promises {n_bytes}; {FIX_HINT}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if kind == "labels" and arr.size and arr.max() >= len(CLASS_NAMES):
        raise DataError(f"{name}: label {arr.max()} out of range 0..{len(CLASS_NAMES) - 1}; {FIX_HINT}")
    return arr


def read_idx(path: Path, kind: str, expected_count: int | None = None, sha256: str | None = None) -> np.ndarray:
    limit = MAX_IDX_BYTES if expected_count is None else idx_size(kind, expected_count)
    data, got = read_content(path, limit)
    if sha256 is not None:
        if got != sha256:
            raise DataError(f"{path}: checksum mismatch: SHA-256 of the decompressed content is {got[:16]}…, "
                            f"expected {sha256[:16]}…; the file is corrupt or not Fashion-MNIST; {FIX_HINT}")
    return parse_idx(data, kind, expected_count, name=str(path))


# ---------------------------------------------------------------------------- locating

def find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def has_dataset(directory: Path) -> bool:
    return all(find_file(directory, f.stem) is not None for f in FILES.values())


def named_dir(data_dir: str | Path | None = None) -> tuple[str, Path] | None:
    """The place the user named, if any: --data-dir, else $FMNIST_DATA."""
    if data_dir:
        return "--data-dir", Path(data_dir)
    if os.environ.get("FMNIST_DATA"):
        return "$FMNIST_DATA", Path(os.environ["FMNIST_DATA"])
    return None


def candidate_dirs(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """Where to look: the place the user named alone, else Debian's package, then the user cache."""
    named = named_dir(data_dir)
    if named:
        return [named]
    return [("Debian package dataset-fashion-mnist", DEBIAN_DIR), ("user cache", cache_dir())]


def check_named_dir(label: str, d: Path) -> None:
    """A place the user named is used or refused, never quietly replaced by another copy."""
    undo = "leave out --data-dir" if label == "--data-dir" else "unset FMNIST_DATA"
    todo = (f"put the four Fashion-MNIST files there (`fmnist data --download` fetches them into {cache_dir()}), "
            f"or {undo} to use the Debian package or the cache")
    if not d.exists():
        raise DataError(f"{label} {d} does not exist; {todo}")
    if not d.is_dir():
        raise DataError(f"{label} {d} is not a directory; {todo}")
    missing = [s.stem + ".gz" for s in FILES.values() if find_file(d, s.stem) is None]
    if missing:
        raise DataError(f"{label} {d} lacks {', '.join(missing)} (or the same without .gz); {todo}")


def locate(data_dir: str | Path | None = None, download: bool = True, mirrors=None) -> Path:
    """The directory holding all four files. A place the user named (--data-dir, $FMNIST_DATA) is
    the only one tried; otherwise Debian's package, then the cache, then a download into the cache."""
    named = named_dir(data_dir)
    if named:
        check_named_dir(*named)
        return named[1]
    for _, d in candidate_dirs():
        if has_dataset(d):
            return d
    if not download:
        raise DataError("Fashion-MNIST not found in " + ", ".join(str(d) for _, d in candidate_dirs())
                        + "; run `fmnist data --download`, or `apt-get install dataset-fashion-mnist` on Debian")
    target = cache_dir()
    log.info(f"Fashion-MNIST not found locally; downloading into {target}")
    fetch_all(target, mirrors=mirrors)
    return target


# ---------------------------------------------------------------------------- download

def download_limit(spec: IdxFile) -> int:
    """Most bytes a mirror may send for spec: its content size plus gzip's worst-case growth on
    incompressible data (well under 1% + a header), so an endless or padded body is cut off."""
    size = idx_size(spec.kind, spec.count)
    return size + size // 100 + (64 << 10)


def _fetch(url: str, dest: Path, timeout: float, limit: int) -> None:
    """Stream url to dest through a temp file, at most `limit` bytes; the progress bar shows bytes."""
    from tqdm import tqdm

    too_big = f"{url}: sends more than {limit:,} bytes, more than the file can be; the mirror serves the wrong file"
    with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        if total is not None and total > limit:
            raise DataError(too_big)
        got = 0
        show = log.isEnabledFor(logging.INFO)  # a bar where INFO messages show and stderr is a terminal
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                         disable=None if show else True, leave=False) as bar:
            while chunk := resp.read(1 << 16):
                got += len(chunk)
                if got > limit:
                    raise DataError(too_big)
                f.write(chunk)
                bar.update(len(chunk))
            if total is not None and got != total:
                raise DataError(f"{url}: connection closed after {got} of {total} bytes")


def fetch_file(spec: IdxFile, dest_dir: Path, mirrors=None, retries: int = 3, timeout: float = 30.0) -> Path:
    """Download one file, trying each mirror `retries` times; keep it only if its content verifies."""
    mirrors = list(mirrors or MIRRORS)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (spec.stem + ".gz")
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + spec.stem + ".gz"
        for attempt in range(1, retries + 1):
            staging = dest.with_name(dest.name + ".download")
            try:
                _fetch(url, staging, timeout, download_limit(spec))
                read_idx(staging, spec.kind, spec.count, spec.sha256)  # verify before it becomes visible
                os.replace(staging, dest)
                return dest
            except (urllib.error.URLError, http.client.HTTPException, OSError, DataError, TimeoutError) as e:
                errors.append(f"{url} (try {attempt}): {getattr(e, 'reason', None) or e}")
                staging.unlink(missing_ok=True)
                if isinstance(e, DataError) and ("checksum" in str(e) or "more than" in str(e)):
                    break  # a mirror serving wrong bytes will not fix itself; next mirror
                time.sleep(min(2 ** (attempt - 1), 4) * 0.25)
    raise DataError(f"could not download {spec.stem}.gz:\n  " + "\n  ".join(errors)
                    + "\nCheck your network, or install the files by hand (Debian: apt-get install "
                      "dataset-fashion-mnist) and pass --data-dir.")


def fetch_all(dest_dir: Path, mirrors=None, refetch_bad: bool = False, **kw) -> Path:
    """Download each file dest_dir lacks; with refetch_bad, also each one it has that does not
    verify (what `fmnist data --download` does, the fix every verification error suggests)."""
    for spec in FILES.values():
        have = find_file(dest_dir, spec.stem)
        if have is not None and refetch_bad:
            try:
                read_idx(have, spec.kind, spec.count, spec.sha256)
            except DataError:
                log.warning(f"{have} does not verify; downloading it again")
                have = None
        if have is None:
            fetch_file(spec, dest_dir, mirrors=mirrors, **kw)  # NAME.gz, which find_file prefers
    return dest_dir


# ---------------------------------------------------------------------------- loading

@dataclass
class FashionMNIST:
    """The whole dataset as uint8 tensors: images (N, 28, 28), labels (N,) int64."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path

    def first_test(self, n: int | None) -> "FashionMNIST":
        """Only the first n test images (all where n is None or 0): what a run trained with
        --test-subset N reports on, so its figures compare on the same images."""
        return replace(self, test_images=self.test_images[:n], test_labels=self.test_labels[:n]) if n else self


# The files last read and verified in this process, by (path, size, modification time): `fmnist
# train` reads the dataset to train, then again to report on the test set, and a changed file
# is read anew. 0.4 s a read on one core. load() hands out copies, so nothing held here is shared.
_VERIFIED: dict[tuple[str, int, int], np.ndarray] = {}


def _read_verified(path: Path, spec) -> np.ndarray:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        arr = read_idx(path, spec.kind, spec.count, spec.sha256)
        if len(_VERIFIED) >= len(FILES):   # one dataset's files at a time
            _VERIFIED.clear()
        _VERIFIED[key] = arr
    return _VERIFIED[key]


def load_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The four files as arrays, each verified against its SHA-256 (once per process while the
    file is unchanged)."""
    out = {}
    for key, spec in FILES.items():
        path = find_file(directory, spec.stem)
        if path is None:
            raise DataError(f"{directory / (spec.stem + '.gz')}: missing; {FIX_HINT}")
        out[key] = _read_verified(path, spec)
    return out


def load(data_dir: str | Path | None = None, download: bool = True) -> FashionMNIST:
    """The verified dataset (found, or downloaded, as `locate` says)."""
    root = locate(data_dir, download=download)
    a = load_arrays(root)
    t = lambda x: torch.from_numpy(x.copy())  # noqa: E731 - frombuffer arrays are read-only
    return FashionMNIST(t(a["train-images"]), t(a["train-labels"]).long(),
                        t(a["t10k-images"]), t(a["t10k-labels"]).long(), root)


def split_seed(cfg) -> int:
    """The seed of a run's validation split (cfg: a TrainConfig or its saved dict): split_seed,
    or the run's seed where that is -1 (and in configs saved before split_seed existed)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, d)
    s = get("split_seed", -1)
    return get("seed", 0) if s is None or s < 0 else s


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): val takes round(val_fraction * n_c) of each class c, chosen by seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(val_fraction * len(idx))
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
