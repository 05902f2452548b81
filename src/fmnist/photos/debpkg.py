"""Files inside Debian packages: a .deb downloaded from a mirror's pool, a member read out of it in Python.

A photo-set row names its source as `deb:PACKAGE=VERSION/POOL_PATH#MEMBER`, e.g.

    deb:mate-backgrounds=1.26.0-1/pool/main/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb
        #usr/share/backgrounds/mate/nature/LadyBird.jpg      (one line, no space)

POOL_PATH is the package's `Filename:` as `apt-cache show PACKAGE=VERSION` prints it (the pool folder
is named after the source package, which may differ from the binary package's name), and MEMBER is
the file's path as installed. The .deb is fetched from `$FMNIST_DEBIAN_MIRROR/POOL_PATH`, by default
the official archive; a version that has left it is still in Debian's snapshot archive (point the
variable at a snapshot's debian/ folder). No dpkg is needed: a .deb is an `ar` archive whose
`data.tar.*` holds the files.

A pool file never changes once published (the archive refuses a second upload of a version), and
each row's `source_sha256` is the member's own SHA-256, checked after it is read, as for the other
sources; the .deb's hash is in the package index (`apt-cache show`) for whoever wants to check that too.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import threading
import urllib.request
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

MIRROR_ENV = "FMNIST_DEBIAN_MIRROR"
DEFAULT_MIRROR = "https://deb.debian.org/debian"
MAX_DEB_BYTES = 512 << 20   # the largest package a set takes from is ~160 MB; more is the wrong file
MAX_DATA_BYTES = 2 << 30    # the unpacked data.tar: a bound on what a hostile mirror can make us write

SOURCE = re.compile(r"deb:(?P<package>[a-z0-9][a-z0-9+.\-]*)=(?P<version>[A-Za-z0-9.+~:\-]+)"
                    r"/(?P<pool>pool/[^#]+/(?P<file>[^/#]+\.deb))#(?P<member>[^#]+)")


class DebError(Exception):
    """A package or member that cannot be had; the message says which and why."""


def parse(source: str) -> re.Match:
    """The parts of a `deb:` source; the .deb's file name must be the one Debian gives that version."""
    m = SOURCE.fullmatch(source)
    if not m:
        raise DebError(f"source {source!r}: expected deb:PACKAGE=VERSION/pool/.../PACKAGE_VERSION_ARCH.deb#PATH "
                       f"(the pool path as `apt-cache show PACKAGE=VERSION` gives it under Filename)")
    version = m["version"].split(":", 1)[-1]   # the file name leaves the epoch out
    if not m["file"].startswith(f"{m['package']}_{version}_"):
        raise DebError(f"source {source!r}: {m['file']} is not a file of {m['package']} {m['version']} "
                       f"(expected {m['package']}_{version}_ARCH.deb)")
    return m


def mirror() -> str:
    return (os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR).rstrip("/")


def download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into `dest`, at most MAX_DEB_BYTES; a short body is an error."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        size = int(resp.headers.get("Content-Length") or 0)
        if size > MAX_DEB_BYTES:
            raise DebError(f"{url}: {size:,} bytes, more than a package of photos can be")
        got = 0
        while chunk := resp.read(1 << 20):
            got += len(chunk)
            if got > MAX_DEB_BYTES:
                raise DebError(f"{url}: more than {MAX_DEB_BYTES:,} bytes, more than a package of photos can be")
            out.write(chunk)
    if size and got != size:   # a dropped connection: an OSError, so the caller tries again
        raise ConnectionError(f"{url}: connection closed after {got:,} of {size:,} bytes")


class _Section(io.RawIOBase):
    """Bytes [offset, offset + size) of an open file, read as a stream."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.left = f, size
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[:min(len(buf), self.left)])
        self.left -= n
        return n


def _data_member(f, name: str) -> tuple[str, int, int]:
    """(member name, offset, size) of the data.tar.* member of the ar archive `f` (a .deb)."""
    if f.read(8) != b"!<arch>\n":
        raise DebError(f"{name} is not a Debian package (no ar archive header)")
    seen = []
    while header := f.read(60):
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DebError(f"{name}: a damaged ar header after {', '.join(seen) or 'the start'}")
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        if member.startswith("data.tar"):
            return member, f.tell(), size
        seen.append(member)
        f.seek(size + size % 2, os.SEEK_CUR)   # members are padded to an even length
    raise DebError(f"{name} holds no data.tar.* (members: {', '.join(seen) or 'none'}): not a binary package")


def _decompressor(kind: str, raw):
    if kind == "data.tar":
        return raw
    if kind == "data.tar.xz":
        return lzma.LZMAFile(raw)
    if kind == "data.tar.gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == "data.tar.bz2":
        return bz2.BZ2File(raw)
    if kind == "data.tar.zst":
        try:
            from compression import zstd   # Python 3.14+

            return zstd.ZstdFile(raw)
        except ImportError:
            pass
        try:
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(raw)
        except ImportError:
            raise DebError("this package's files are zstd-compressed (data.tar.zst): install the `zstandard` "
                           "module, or use Python 3.14+") from None
    raise DebError(f"unknown member {kind} (expected data.tar with xz, gz, bz2 or zst)")


def unpack_data(deb: Path, dest: Path) -> None:
    """Write the uncompressed data.tar of `deb` to `dest`."""
    with open(deb, "rb") as f:
        kind, offset, size = _data_member(f, deb.name)
        src = _decompressor(kind, io.BufferedReader(_Section(f, offset, size), 1 << 20))
        written = 0
        with open(dest, "wb") as out:
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
                    raise DebError(f"{deb.name}: {kind} is damaged ({e})") from None
                if not chunk:
                    break
                written += len(chunk)
                if written > MAX_DATA_BYTES:
                    raise DebError(f"{deb.name}: {kind} unpacks to more than {MAX_DATA_BYTES:,} bytes")
                out.write(chunk)


GIVE_UP = 3  # failed downloads of one package before its other rows stop trying (each row retries on its own)


class Debs:
    """Packages downloaded once per fetch and unpacked once: the rows that take files from the same
    .deb share it. A package's data.tar is kept uncompressed on disk and read by member."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fmnist-debs-"))
        self.lock = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}
        self.tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self.failed: dict[str, list[str]] = {}

    def member(self, source: str, timeout: float) -> bytes:
        m = parse(source)
        with self.lock:
            lock = self.locks.setdefault(m["file"], threading.Lock())
        with lock:   # one download per package; reads share the package's open file
            if m["file"] not in self.tars:
                tries = self.failed.setdefault(m["file"], [])
                if len(tries) >= GIVE_UP:
                    raise DebError(f"{m['file']}: not downloaded after {len(tries)} tries ({tries[-1]})")
                try:
                    self.tars[m["file"]] = self._open(m["pool"], m["file"], timeout)
                except Exception as e:
                    tries.append(str(getattr(e, "reason", None) or e))
                    raise
            tar, index = self.tars[m["file"]]
            info = index.get(m["member"].removeprefix("/"))
            if info is None:
                raise DebError(f"{m['file']} has no file {m['member']} (`dpkg-deb -c` lists what it holds)")
            f = tar.extractfile(info)
            if f is None:
                raise DebError(f"{m['file']}: {m['member']} is not a regular file")
            return f.read()

    def _open(self, pool: str, file: str, timeout: float):
        url = f"{mirror()}/{pool}"
        deb, data = self.dir / file, self.dir / (file + ".data.tar")
        log.info("downloading %s", url)
        try:
            download(url, deb, timeout)
            unpack_data(deb, data)
        finally:
            deb.unlink(missing_ok=True)
        tar = tarfile.open(data, "r:")
        index = {i.name.removeprefix("./"): i for i in tar.getmembers()}
        return tar, index

    def close(self) -> None:
        for tar, _ in self.tars.values():
            tar.close()
        shutil.rmtree(self.dir, ignore_errors=True)
