"""A catalogue index on disk: the vectors in a vector-search engine's own file, a manifest, the
items' sources and labels, and small thumbnails.

    DIR/manifest.json           format, model record (embedding.py), engine and its settings,
                                item count, the files below; written last, atomically
    DIR/vectors-<count>.<ext>   the engine's index file holding items 0 .. count-1 (none for
                                milvus: its vectors live in a collection, below)
    DIR/items-<start>.json      one chunk per build or add: [{source, label or predicted}, ...]
    DIR/thumbs-<start>.npy      that chunk's thumbnails, (n, 28, 28) or (n, 64, 64, 3) uint8

Item ids are positions, 0 .. count-1, in the order items were added. Adding items writes a
new chunk and a new vectors file (the engine's graph extended, nothing re-embedded or rebuilt),
then the manifest that names them, then removes the old vectors file: a crash at any point
leaves the old index or the new one, never a mix, and a process that has an index open keeps
searching it (opening one in the instant between the manifest and the removal fails with
"missing": open it again). One writer at a time (a lock file).

Engines (all HNSW graphs, inner product on unit vectors, so distance = 1 - cosine similarity):
faiss (the default, chosen by `fmnist bench search`'s engines part: docs/search.md), usearch,
and milvus. All are optional (`pip install 'fmnist[search]'`) and imported only here, only when used.

milvus keeps the vectors in a collection of a Milvus database instead of a file in DIR: a
Milvus server or cluster by URI (http://host:19530, a token from $FMNIST_MILVUS_TOKEN, never
written down), or Milvus Lite, a local database, by default DIR/milvus.db. Rows are (id = item
position, vector). A collection cannot be renamed into place, so the order of writing is what
keeps it consistent: an add inserts its rows first (ids count .. count+n-1), confirms them with
a strongly consistent count, then writes the manifest. The manifest's count is the truth: an
opened index searches only ids < count, so rows of an add in progress, or of one that stopped
before its manifest, are never returned, and the next add deletes them before inserting its
own. Fewer rows than the manifest says, a missing collection, or another catalogue's is an
error. DIR (manifest, items, thumbnails) still lives on one disk; a copy of a DIR whose URI is
a server points at the same collection, so add to one copy only. Milvus Lite serves one process
at a time (`fmnist serve --index DIR` and `fmnist index add` on it cannot run together).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
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


MILVUS_TOKEN_ENV = "FMNIST_MILVUS_TOKEN"
MILVUS_LITE_FILE = "milvus.db"          # the default URI: a Milvus Lite database inside DIR
MILVUS_COLLECTION = "fmnist_catalogue"
MILVUS_INSERT_ROWS = 5000   # rows per insert call: 5,000 x 384 float32 = 7.7 MB, under gRPC's 64 MB message cap
MILVUS_TIMEOUT_S = 30       # per call: a server that stops answering is an error, not a hang
_CATALOGUE_KEY = "fmnist.catalogue"     # collection property: the id of the catalogue that owns the rows


class _Captured(logging.Handler):
    """Keeps the messages a library logs instead of answering (Milvus Lite's reason it did not start)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(str(record.exc_info[1]) if record.exc_info else record.getMessage())


def _quiet_pymilvus() -> None:
    """pymilvus installs its own stderr handlers when imported and logs each failed call with a
    traceback; its errors reach our callers as SearchIndexError naming the URI, so its loggers go
    back to the application's logging, and only its critical records pass."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.CRITICAL if name == "pymilvus" else logging.NOTSET)


class MilvusEngine:
    """A Milvus collection, (id = item position, vector) rows with an HNSW index on inner product:
    the same client code for a Milvus server or cluster (http(s)://host:port) and Milvus Lite (a
    local .db, by default DIR/milvus.db). No index file in DIR: ext is None."""

    name = "milvus"
    ext = None

    def __init__(self, client, dim: int, s: EngineSettings, uri: str, shown_uri: str, collection: str, count: int,
                 catalogue: str):
        self.client, self.dim, self.settings = client, dim, s
        self.uri, self.shown_uri, self.collection = uri, shown_uri, collection
        self.count, self.catalogue = count, catalogue     # count: the rows the manifest vouches for

    @staticmethod
    def version() -> str:
        import pymilvus
        return pymilvus.__version__

    # -- connecting

    @staticmethod
    def _where(root: Path, uri: str | None) -> tuple[str, str, bool]:
        """-> (the URI to connect to, the URI the manifest records, whether it is Milvus Lite).
        A Lite file inside DIR is recorded relative to DIR, so the directory can move."""
        uri = uri or MILVUS_LITE_FILE
        if "://" in uri:
            from urllib.parse import urlsplit

            if urlsplit(uri).username or urlsplit(uri).password:
                raise SearchIndexError(f"Milvus URI {uri.split('://')[0]}://...@{uri.split('@')[-1]}: the URI is "
                                       f"written into the manifest, so it may not hold credentials; put the token "
                                       f"(user:password or an API key) in ${MILVUS_TOKEN_ENV} instead")
            return uri, uri, False
        if not uri.endswith(".db"):
            raise SearchIndexError(f"Milvus URI {uri!r}: pass a server (http://host:19530) or a Milvus Lite "
                                   f"database file ending in .db")
        path = (root / uri).resolve()
        try:
            shown = path.relative_to(root.resolve()).as_posix()
        except ValueError:
            shown = str(path)
        return str(path), shown, True

    @classmethod
    def _connect(cls, root: Path, uri: str | None):
        import importlib.util

        target, shown, lite = cls._where(root, uri)
        if lite and importlib.util.find_spec("milvus_lite") is None:
            raise ImportError("a Milvus Lite index (a local .db) needs the optional extra: pip install "
                              "'fmnist[search]' (milvus_lite not installed)")
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        _quiet_pymilvus()
        lite_log, captured = logging.getLogger("milvus_lite.server_manager"), _Captured()
        lite_log.addHandler(captured)
        lite_log.propagate = False      # its reason comes back in our error, without its traceback
        try:
            client = MilvusClient(uri=target, token="" if lite else os.environ.get(MILVUS_TOKEN_ENV, ""),
                                  timeout=MILVUS_TIMEOUT_S)
        except MilvusException as e:
            if lite:
                why = "; ".join(captured.messages) or e.message
                raise SearchIndexError(f"Milvus Lite could not open {target} ({why}); Milvus Lite serves one "
                                       f"process at a time: stop the other one (such as `fmnist serve --index` on "
                                       f"this index), or use a Milvus server") from None
            raise SearchIndexError(f"Milvus at {shown} cannot be reached ({e.message}): start it or correct the "
                                   f"URI; a server that needs a token reads it from ${MILVUS_TOKEN_ENV}") from None
        finally:
            lite_log.removeHandler(captured)
        return client, target, shown, lite

    @contextlib.contextmanager
    def _calls(self, doing: str):
        """Milvus' and gRPC's errors as SearchIndexError naming the server and collection."""
        import grpc
        from pymilvus.client.types import Status
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except (MilvusException, grpc.RpcError) as e:
            why = getattr(e, "message", None) or str(e).splitlines()[0]
            gone = (getattr(e, "code", None) == Status.CONNECT_FAILED
                    or (isinstance(e, grpc.RpcError) and e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                                      grpc.StatusCode.DEADLINE_EXCEEDED)))
            if gone:   # a client made earlier in this process reconnects on each call: the server went away
                raise SearchIndexError(f"Milvus at {self.shown_uri} cannot be reached while {doing} ({why}): start "
                                       f"it or correct the URI; a server that needs a token reads it from "
                                       f"${MILVUS_TOKEN_ENV}") from None
            raise SearchIndexError(f"Milvus at {self.shown_uri}, collection {self.collection}: {doing} failed "
                                   f"({why}); check that the server is up and holds the collection") from None

    # -- creating and opening

    @classmethod
    def create(cls, root: Path, dim: int, s: EngineSettings, uri: str | None = None,
               collection: str | None = None) -> "MilvusEngine":
        collection = collection or MILVUS_COLLECTION
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection):
            raise SearchIndexError(f"Milvus collection name {collection!r}: use letters, digits and underscores, "
                                   f"starting with a letter or underscore")
        if uri and "://" not in uri:
            uri = str(Path(uri).resolve())    # a Lite file named on the command line: from the current directory
        client, target, shown, lite = cls._connect(root, uri)
        e = cls(client, dim, s, target, shown, collection, 0, uuid.uuid4().hex)
        from pymilvus import DataType, MilvusClient

        with e._calls("creating the collection"):
            if client.has_collection(collection):
                if not (lite and Path(target).parent == root.resolve()):
                    raise SearchIndexError(f"Milvus at {shown} already has a collection {collection!r}: choose "
                                           f"another --collection, or drop it if no index uses it (pymilvus: "
                                           f"MilvusClient(URI).drop_collection(NAME))")
                # A Lite database inside DIR belongs to DIR, which has no manifest: a build that stopped.
                log.warning(f"{shown}: dropping collection {collection}, left by a build that did not finish")
                client.drop_collection(collection, timeout=MILVUS_TIMEOUT_S)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            index = client.prepare_index_params()
            index.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                            params={"M": s.M, "efConstruction": s.ef_construction})
            client.create_collection(collection, schema=schema, index_params=index, timeout=MILVUS_TIMEOUT_S,
                                     properties={_CATALOGUE_KEY: e.catalogue})
        log.info(f"created Milvus collection {collection} at {shown}")
        return e

    @classmethod
    def open(cls, root: Path, dim: int, s: EngineSettings, info: dict, count: int) -> "MilvusEngine":
        try:
            uri, collection, catalogue = info["uri"], info["collection"], info["catalogue"]
        except KeyError as e:
            raise SearchIndexError(f"{root / MANIFEST}: damaged (no engine {e}); rebuild the index: "
                                   f"{HOW_TO_BUILD}") from None
        client, target, shown, _ = cls._connect(root, uri)
        e = cls(client, dim, s, target, shown, collection, count, catalogue)
        rebuild = (f"rebuild the index: {HOW_TO_BUILD} --engine milvus --milvus-uri {shown} "
                   f"--collection {collection}")
        with e._calls("opening the collection"):
            if not client.has_collection(collection):
                raise SearchIndexError(f"Milvus at {shown} has no collection {collection!r} (the manifest of "
                                       f"{root} names it): its vectors are gone; {rebuild}")
            desc = client.describe_collection(collection)
            theirs = dict(desc.get("properties") or {}).get(_CATALOGUE_KEY)
            if theirs != catalogue:
                raise SearchIndexError(f"Milvus at {shown}, collection {collection}: holds another catalogue "
                                       f"({theirs}) than the one {root} was built with ({catalogue}); {rebuild}")
            field = next((f for f in desc["fields"] if f["name"] == "vector"), {})
            if int(field.get("params", {}).get("dim", -1)) != dim:
                raise SearchIndexError(f"Milvus at {shown}, collection {collection}: not vectors of {dim} numbers; "
                                       f"{rebuild}")
            if str(client.get_load_state(collection).get("state")) != "Loaded":
                log.info(f"loading Milvus collection {collection} at {shown}")
                client.load_collection(collection, timeout=MILVUS_TIMEOUT_S)
            rows = e.rows()
        if rows < count:
            raise SearchIndexError(f"Milvus at {shown}, collection {collection}: holds {rows} vectors, the manifest "
                                   f"says {count}; {rebuild}")
        if rows > count:
            log.warning(f"Milvus at {shown}, collection {collection}: {rows - count} rows past the manifest's {count} "
                        f"(an add in progress, or one that stopped before its manifest); searches ignore them")
        return e

    def location(self) -> dict:
        """What the manifest records to find the collection again (no credentials), and the server's version."""
        with self._calls("asking its version"):
            server = self.client.get_server_version(timeout=MILVUS_TIMEOUT_S)
        return {"uri": self.shown_uri, "collection": self.collection, "catalogue": self.catalogue, "server": server}

    # -- rows

    def __len__(self) -> int:
        return self.count

    def rows(self) -> int:
        """Rows in the collection now, every write so far included (a strongly consistent count)."""
        r = self.client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong",
                              timeout=MILVUS_TIMEOUT_S)
        return int(r[0]["count(*)"])

    def add(self, vectors: np.ndarray, threads: int = 0) -> None:
        start, n = self.count, len(vectors)
        vectors = np.ascontiguousarray(vectors, np.float32)
        with self._calls("adding vectors"):
            extra = self.rows() - start
            if extra > 0:
                log.warning(f"Milvus at {self.shown_uri}, collection {self.collection}: deleting {extra} rows past "
                            f"the manifest's {start}, left by an add that did not finish")
                self.client.delete(self.collection, filter=f"id >= {start}", timeout=MILVUS_TIMEOUT_S)
            for i in range(0, n, MILVUS_INSERT_ROWS):
                self.client.insert(self.collection, [{"id": start + j, "vector": vectors[j]}
                                                     for j in range(i, min(n, i + MILVUS_INSERT_ROWS))],
                                   timeout=MILVUS_TIMEOUT_S)
            rows = self.rows()
        if rows != start + n:
            raise SearchIndexError(f"Milvus at {self.shown_uri}, collection {self.collection}: {rows} rows after "
                                   f"adding {n} to {start}; is another process writing to it?")
        self.count = start + n

    def search(self, q: np.ndarray, k: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        with self._calls("searching"):
            found = self.client.search(
                self.collection, data=np.ascontiguousarray(q, np.float32), limit=k, output_fields=[],
                filter=f"id < {self.count}",   # rows past the manifest's count are not the index's yet
                search_params={"metric_type": "IP", "params": {"ef": max(self.settings.ef_search, k)}},
                timeout=MILVUS_TIMEOUT_S)
        ids, dist = np.full((len(q), k), -1, np.int64), np.full((len(q), k), np.inf, np.float32)
        for i, hits in enumerate(found):        # fewer than k hits: padded as FAISS pads (-1)
            for j, h in enumerate(list(hits)[:k]):
                ids[i, j], dist[i, j] = h["id"], 1.0 - h["distance"]
        return dist, ids


ENGINES = {"faiss": FaissEngine, "usearch": UsearchEngine, "milvus": MilvusEngine}
DEFAULT_ENGINE = "faiss"
ENGINE_MODULES = {"faiss": "faiss", "usearch": "usearch", "milvus": "pymilvus"}


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
               settings: EngineSettings | None = None, engine_options: dict | None = None) -> "CatalogueIndex":
        """A new, empty index in directory `root`. engine_options: the milvus engine's uri and
        collection (default: a Milvus Lite database in `root`, collection fmnist_catalogue)."""
        root = Path(root)
        if (root / MANIFEST).exists():
            raise SearchIndexError(f"{root} already holds an index; add to it with `fmnist index add SOURCE "
                                   f"--index {root}`, or choose another --out")
        cls_ = engine_class(engine)
        options = {k: v for k, v in (engine_options or {}).items() if v is not None}
        if options and cls_.ext is not None:
            raise ValueError(f"the {engine} engine keeps its vectors in DIR and takes no {', '.join(options)}")
        root.mkdir(parents=True, exist_ok=True)
        settings = settings or EngineSettings()
        eng = cls_.create(root, model["dim"], settings, **options) if cls_.ext is None else cls_(model["dim"], settings)
        return cls(root, model, eng, settings, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

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
        if cls_.ext is None:      # vectors in a database's collection: it checks its rows against count
            engine = cls_.open(root, dim, settings, m["engine"], count)
        elif vec is None:
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
            old_vectors = self._vectors_name(start) if start and self.engine.ext else None
            self.engine.add(vectors, threads=threads)
            name = None
            if self.engine.ext:      # a file engine: a new vectors file; a database's rows are in already
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

    def _manifest(self, vectors: str | None) -> dict:
        from dataclasses import asdict

        where = self.engine.location() if self.engine.ext is None else {}
        return {"format": FORMAT, "version": VERSION, "count": len(self), "model": self.model,
                "engine": {"name": self.engine.name, "version": self.engine.version(),
                           "settings": asdict(self.settings), **where},
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
