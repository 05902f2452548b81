"""A catalogue index on disk: the vectors in a vector-search engine's own file, a manifest, the
items' sources and labels, and small thumbnails.

    DIR/manifest.json           format, model record (embedding.py), engine and its settings,
                                item count, the files below; written last, atomically
    DIR/vectors-<count>.<ext>   the engine's index file holding items 0 .. count-1
    DIR/items-<start>.json      one chunk per build or add: [{source, label or predicted}, ...]
    DIR/thumbs-<start>.npy      that chunk's thumbnails, (n, 28, 28) or (n, 64, 64, 3) uint8

Item ids are positions, 0 .. count-1, in the order items were added. Adding items writes a
new chunk and a new vectors file (the engine's graph extended, nothing re-embedded or rebuilt),
then the manifest that names them, then removes the old vectors file: a crash at any point
leaves the old index or the new one, never a mix, and a process that has an index open keeps
searching it (opening one in the instant between the manifest and the removal fails with
"missing": open it again). One writer at a time (a lock file).

Engines (both HNSW graphs, inner product on unit vectors, so distance = 1 - cosine similarity):
faiss (the default, chosen by `fmnist bench search`'s engines part: docs/search.md) and usearch.
Both are optional (`pip install 'fmnist[search]'`) and imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist.utils.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

FORMAT = "fmnist-catalogue-index"
VERSION = 1
MANIFEST = "manifest.json"
HOW_TO_BUILD = "build one with `fmnist index build SOURCE --out DIR`"


class SearchIndexError(ValueError):
    """An index that cannot be used (missing, damaged, another model's); the message says what to do."""


@dataclass
class EngineSettings:
    # HNSW graph degree: 32 neighbours per node, 64 on the bottom layer: 256 bytes of links per
    # item beside its 1,536-byte vector (384 float32). Recall and latency: docs/search.md.
    M: int = 32
    # Candidate list while inserting: build time against graph quality. 40 (FAISS's default)
    # builds 1M items in about half the time of 80, and still met recall@10 >= 0.95 at 1M.
    ef_construction: int = 40
    ef_search: int = 64          # candidate list while searching (at least k): latency against recall


# ---------------------------------------------------------------------------- engines

class FaissEngine:
    """FAISS IndexHNSWFlat: vectors kept in full (float32), HNSW graph over them."""

    name = "faiss"
    ext = "faiss"

    def __init__(self, dim: int, s: EngineSettings, index=None):
        import faiss

        self.faiss, self.settings = faiss, s
        if index is None:
            index = faiss.IndexHNSWFlat(dim, s.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = s.ef_construction
        self.index = index

    @staticmethod
    def version() -> str:
        import faiss
        return faiss.__version__

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray, threads: int = 0) -> None:
        with self._threads(threads):
            self.index.add(np.ascontiguousarray(vectors, np.float32))

    def search(self, q: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(self.settings.ef_search, k)
        with self._threads(threads):
            sim, ids = self.index.search(np.ascontiguousarray(q, np.float32), k)
        return 1.0 - sim, ids

    @contextlib.contextmanager
    def _threads(self, n: int):
        if not n:
            yield
            return
        old = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(n)
        try:
            yield
        finally:
            self.faiss.omp_set_num_threads(old)

    def save(self, path: Path) -> None:
        self.faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int, s: EngineSettings) -> "FaissEngine":
        import faiss

        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            why = str(e).splitlines()[0].rsplit("Error: ", 1)[-1][:120]
            raise SearchIndexError(f"{path}: not a readable FAISS index ({why}); rebuild the index: "
                                   f"{HOW_TO_BUILD}") from None
        if index.d != dim:
            raise SearchIndexError(f"{path}: vectors of {index.d} numbers, the manifest says {dim}; rebuild the "
                                   f"index: {HOW_TO_BUILD}")
        return cls(dim, s, index)


class UsearchEngine:
    """usearch Index (HNSW), float32 vectors, keys = item ids."""

    name = "usearch"
    ext = "usearch"

    def __init__(self, dim: int, s: EngineSettings, index=None):
        from usearch.index import Index

        self.settings = s
        self.index = index if index is not None else Index(
            ndim=dim, metric="ip", dtype="f32", connectivity=s.M, expansion_add=s.ef_construction,
            expansion_search=s.ef_search)

    @staticmethod
    def version() -> str:
        import usearch
        return usearch.__version__

    def __len__(self) -> int:
        return len(self.index)

    def add(self, vectors: np.ndarray, threads: int = 0) -> None:
        start = len(self.index)
        self.index.add(np.arange(start, start + len(vectors), dtype=np.uint64),
                       np.ascontiguousarray(vectors, np.float32), threads=threads)

    def search(self, q: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self.index.expansion_search = max(self.settings.ef_search, k)
        m = self.index.search(np.ascontiguousarray(q, np.float32), k, threads=threads)
        # One query gives Matches (only the hits found), several give BatchMatches (k wide, counts)
        counts = np.asarray(m.counts).reshape(len(q)) if hasattr(m, "counts") else np.array([len(m.keys)])
        keys, dist = np.full((len(q), k), -1, np.int64), np.full((len(q), k), np.inf, np.float32)
        mk, md = np.asarray(m.keys).reshape(len(q), -1), np.asarray(m.distances).reshape(len(q), -1)
        for i, c in enumerate(counts):   # fewer than k items: padded as FAISS pads (-1)
            keys[i, :c], dist[i, :c] = mk[i, :c], md[i, :c]
        return dist, keys

    def save(self, path: Path) -> None:
        self.index.save(str(path))

    @classmethod
    def load(cls, path: Path, dim: int, s: EngineSettings) -> "UsearchEngine":
        from usearch.index import Index

        try:
            index = Index.restore(str(path))
        except Exception as e:  # usearch raises plain RuntimeError/ValueError on a bad file
            raise SearchIndexError(f"{path}: not a readable usearch index ({e}); rebuild the index: "
                                   f"{HOW_TO_BUILD}") from None
        if index is None or index.ndim != dim:
            raise SearchIndexError(f"{path}: not a usearch index of {dim}-number vectors; rebuild the index: "
                                   f"{HOW_TO_BUILD}")
        return cls(dim, s, index)


ENGINES = {"faiss": FaissEngine, "usearch": UsearchEngine}
DEFAULT_ENGINE = "faiss"
ENGINE_MODULES = {"faiss": "faiss", "usearch": "usearch"}


def engine_class(name: str):
    import importlib.util

    if name not in ENGINES:
        raise ValueError(f"unknown search engine {name!r}; choose from {', '.join(ENGINES)}")
    if importlib.util.find_spec(ENGINE_MODULES[name]) is None:
        raise ImportError(f"visual search with the {name} engine needs the optional extra: "
                          f"pip install 'fmnist[search]' ({ENGINE_MODULES[name]} not installed)")
    return ENGINES[name]


# ---------------------------------------------------------------------------- the index on disk

@dataclass
class Chunk:
    start: int
    count: int
    items: str     # file names inside the index directory
    thumbs: str


@dataclass
class Neighbour:
    id: int
    distance: float
    source: str
    label: str | None          # the catalogue's own label (dataset, photo-set manifest), if known
    predicted: str | None      # the model's class, for an item the catalogue gives no label

    @property
    def shown_class(self) -> str:
        return self.label or f"{self.predicted}?"

    def to_dict(self) -> dict:
        return {"id": self.id, "distance": round(self.distance, 6), "source": self.source, "label": self.label,
                "predicted": self.predicted}


@dataclass
class CatalogueIndex:
    root: Path
    model: dict
    engine: object
    settings: EngineSettings
    chunks: list[Chunk] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    created: str = ""
    _items: list[dict] | None = None

    # -- creating and opening

    @classmethod
    def create(cls, root: str | Path, model: dict, engine: str = DEFAULT_ENGINE,
               settings: EngineSettings | None = None) -> "CatalogueIndex":
        root = Path(root)
        if (root / MANIFEST).exists():
            raise SearchIndexError(f"{root} already holds an index; add to it with `fmnist index add SOURCE "
                                   f"--index {root}`, or choose another --out")
        root.mkdir(parents=True, exist_ok=True)
        settings = settings or EngineSettings()
        return cls(root, model, engine_class(engine)(model["dim"], settings), settings,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def open(cls, root: str | Path) -> "CatalogueIndex":
        root = Path(root)
        man = root / MANIFEST
        if not root.is_dir():
            raise SearchIndexError(f"no index at {root} (no such directory): {HOW_TO_BUILD}")
        if not man.is_file():
            raise SearchIndexError(f"no index at {root} ({MANIFEST} is missing): {HOW_TO_BUILD}")
        try:
            m = json.loads(man.read_text())
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
            if m.get("version") != VERSION:
                raise ValueError(f"version {m.get('version')!r}; this fmnist reads version {VERSION}")
            settings = EngineSettings(**m["engine"]["settings"])
            chunks = [Chunk(**c) for c in m["chunks"]]
            count, model, name = int(m["count"]), dict(m["model"]), m["engine"]["name"]
            dim = int(model["dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise SearchIndexError(f"{man}: damaged ({e}); rebuild the index: {HOW_TO_BUILD}") from None
        if sum(c.count for c in chunks) != count:
            raise SearchIndexError(f"{man}: damaged (its chunks hold {sum(c.count for c in chunks)} items, it says "
                                   f"{count}); rebuild the index: {HOW_TO_BUILD}")
        cls_ = engine_class(name)
        vec = root / m["vectors"] if m.get("vectors") else None
        if vec is None:
            engine = cls_(dim, settings)
        elif not vec.is_file():
            raise SearchIndexError(f"{vec}: missing (the manifest names it); rebuild the index: {HOW_TO_BUILD}")
        else:
            engine = cls_.load(vec, dim, settings)
        if len(engine) != count:
            raise SearchIndexError(f"{vec}: holds {len(engine)} vectors, the manifest says {count}; rebuild the "
                                   f"index: {HOW_TO_BUILD}")
        for c in chunks:
            for f in (c.items, c.thumbs):
                if not (root / f).is_file():
                    raise SearchIndexError(f"{root / f}: missing (the manifest names it); rebuild the index: "
                                           f"{HOW_TO_BUILD}")
        return cls(root, model, engine, settings, chunks, list(m.get("sources", [])), m.get("created", ""))

    def __len__(self) -> int:
        return len(self.engine)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def check_model(self, model: dict) -> None:
        """Refuse to compare vectors of different weights or recipes."""
        mine = (self.model.get("embedding"), self.model.get("dim"), self.model.get("weights_sha256"))
        theirs = (model.get("embedding"), model.get("dim"), model.get("weights_sha256"))
        if mine != theirs:
            raise SearchIndexError(
                f"the index at {self.root} was built with another model ({self.model.get('description')}, "
                f"{self.model.get('checkpoint')}, weights {str(self.model.get('weights_sha256'))[:12]}, "
                f"{self.model.get('embedding')}) than this one ({model.get('description')}, {model.get('checkpoint')}, "
                f"weights {str(model.get('weights_sha256'))[:12]}, {model.get('embedding')}): query it with the "
                f"model it was built with (--checkpoint), or rebuild it with this one")

    # -- writing

    @contextlib.contextmanager
    def _writer_lock(self):
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SearchIndexError(f"{self.root}: another process is writing to this index; wait for it "
                                       f"to finish") from None
            yield

    def add(self, vectors: np.ndarray, items: list[dict], thumbs: np.ndarray, source: str, threads: int = 0) -> None:
        """Append items (vectors (n, dim) unit rows; items [{source, label, predicted}]; thumbs (n, ...)
        uint8) and write the new index state. Nothing already in the index is recomputed."""
        if not (len(vectors) == len(items) == len(thumbs)):
            raise ValueError(f"{len(vectors)} vectors, {len(items)} items and {len(thumbs)} thumbnails")
        if len(vectors) == 0:
            return
        with self._writer_lock():
            start = len(self)
            chunk = Chunk(start, len(items), f"items-{start:09d}.json", f"thumbs-{start:09d}.npy")
            with atomic_path(self.root / chunk.thumbs) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(thumbs, np.uint8))
            write_json(self.root / chunk.items, items)
            old_vectors = self._vectors_name(start) if start else None
            self.engine.add(vectors, threads=threads)
            name = self._vectors_name(len(self))
            with atomic_path(self.root / name) as tmp:
                self.engine.save(tmp)
            self.chunks.append(chunk)
            if source not in self.sources:
                self.sources.append(source)
            write_json(self.root / MANIFEST, self._manifest(name))
            if old_vectors:
                (self.root / old_vectors).unlink(missing_ok=True)
            if self._items is not None:
                self._items.extend(items)

    def _vectors_name(self, count: int) -> str:
        return f"vectors-{count:09d}.{self.engine.ext}"

    def _manifest(self, vectors: str) -> dict:
        from dataclasses import asdict

        return {"format": FORMAT, "version": VERSION, "count": len(self), "model": self.model,
                "engine": {"name": self.engine.name, "version": self.engine.version(),
                           "settings": asdict(self.settings)},
                "vectors": vectors, "chunks": [asdict(c) for c in self.chunks], "sources": self.sources,
                "created": self.created, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    # -- reading

    def items(self) -> list[dict]:
        """Every item's {source, label, predicted}, in id order (read once, then kept)."""
        if self._items is None:
            out = []
            for c in self.chunks:
                out.extend(self._chunk_file(c.items, c.count, "items",
                                            lambda p: json.loads(p.read_text())))
            self._items = out
        return self._items

    def _chunk_file(self, name: str, count: int, what: str, read):
        """A chunk's file read by `read`, holding the `count` entries the manifest says."""
        path = self.root / name
        try:
            part = read(path)
        except (OSError, ValueError) as e:
            raise SearchIndexError(f"{path}: unreadable ({e}); rebuild the index: {HOW_TO_BUILD}") from None
        if len(part) != count:
            raise SearchIndexError(f"{path}: {len(part)} {what}, the manifest says {count}; "
                                   f"rebuild the index: {HOW_TO_BUILD}")
        return part

    def thumbnail(self, item_id: int) -> np.ndarray:
        """The thumbnail of item `item_id` (28x28 grey or 64x64 RGB uint8), read from its chunk."""
        if not 0 <= item_id < len(self):
            raise KeyError(item_id)
        for c in self.chunks:
            if c.start <= item_id < c.start + c.count:
                a = self._chunk_file(c.thumbs, c.count, "thumbnails", lambda p: np.load(p, mmap_mode="r"))
                return np.array(a[item_id - c.start])
        raise KeyError(item_id)

    def search(self, vectors: np.ndarray, k: int, threads: int = 0) -> list[list[Neighbour]]:
        """The k nearest items of each query vector, nearest first (fewer if the index is smaller)."""
        if len(self) == 0:
            return [[] for _ in vectors]
        k = min(k, len(self))
        dist, ids = self.engine.search(vectors, k, threads=threads)
        items = self.items()
        return [[Neighbour(int(i), float(d), items[i]["source"], items[i].get("label"), items[i].get("predicted"))
                 for d, i in zip(drow, irow) if i >= 0] for drow, irow in zip(dist, ids)]
