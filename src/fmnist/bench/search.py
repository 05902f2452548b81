"""`fmnist bench search`: how well and how fast visual search works, written to JSON as it goes.

  engines   FAISS HNSW against usearch HNSW, the same settings, on one 100k catalogue: build time,
            query p50/p99, recall@10 against exact search (the measurement behind the default engine);
            and milvus, a Milvus Lite database holding the same vectors (HNSW, the same settings),
            searched through the Milvus client as a cluster would be. --search-engines picks
            some: they replace their own entries and keep the others (each with its environment)
  quality   Fashion-MNIST test images as queries against the 60,000 training images: same-class
            precision@10 and mAP@100, beside raw pixels and PCA of the pixels to the embedding's
            dimension (exact search for all three); and the same item from a photo: 1,000 test
            images rendered as product photos (photos/render.py), converted as `fmnist predict` converts,
            queried against a catalogue of the training images plus the 10,000 test originals
  scale     catalogues of 10k, 100k and 1M items with the default engine: build time, size on disk
            and in memory, query latency of the index alone on one thread (one query and batches),
            recall@10 against exact search; embedding and conversion are timed apart (quality)

Catalogues past 60,000 items: the training images' embeddings, then augmented copies of the
training images (shifted up to 2 px, half mirrored, half with a rectangle erased), each embedded by
the model (--copies embedded, the default; ~17 minutes of this 2-core machine for 1M items, cached
per copy); or, with --copies moved, the training embeddings moved in embedding space as far as a
real augmented copy moves one, measured on 2,000 training images (augmentation_spread): seconds
instead of minutes, for trying settings.

Each part and catalogue size is its own entry of OUT/search.json, written when it is done, so a
measurement can be split over several commands (--search-parts, --sizes). The training images'
embeddings are cached in ~/.cache/fmnist/search-bench/, keyed by the model's weights.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch


log = logging.getLogger(__name__)


def augmented_copy(images: torch.Tensor, copy: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> the same images shifted up to 2 px each way, half mirrored, half with
    a rectangle erased; copy c of the catalogue uses generator seed c, so it is reproducible."""
    from fmnist.training.augment import erase, flip, translate

    g = torch.Generator().manual_seed(copy)
    x = images.unsqueeze(1).float()
    x = erase(flip(translate(x, 2, g), g), 0.5, g)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def train_vectors(embedder, train_images: torch.Tensor, cache: Path) -> np.ndarray:
    """(60000, dim): the training images' embeddings, cached per model weights (fewer images, as
    a dry run takes: embedded, not cached)."""
    from fmnist.utils.atomic import atomic_path

    if len(train_images) < 60_000:
        return embedder.embed_images(train_images)
    cache = cache / embedder.model_record["weights_sha256"][:16]
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / "train.npy"
    if f.exists():
        v = np.load(f)
        if v.shape == (len(train_images), embedder.dim):
            return v
        log.warning(f"{f}: {v.shape} is not the training images' embeddings; embedding them again")
    t = time.perf_counter()
    v = embedder.embed_images(train_images)
    log.info(f"embedded the {len(v)} training images in {time.perf_counter() - t:.0f} s")
    with atomic_path(f) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, v)
    return v


def augmentation_spread(embedder, train_images: torch.Tensor, n: int = 2000, copies: int = 3) -> dict:
    """How far an augmented copy's embedding lies from its original's: cosine distance between
    the embeddings of n training images and of `copies` augmented copies of each."""
    base = embedder.embed_images(train_images[:n])
    d = [1 - (base * embedder.embed_images(augmented_copy(train_images[:n], c))).sum(1) for c in range(1, copies + 1)]
    d = np.concatenate(d)
    return {"images": n, "copies": copies, "mean_cosine_distance": float(d.mean()),
            "p10": float(np.percentile(d, 10)), "p90": float(np.percentile(d, 90))}


def embedded_copies(embedder, train_images: torch.Tensor, cache: Path | None):
    """copy(c) -> (len(train_images), dim): the embeddings of augmented copy c of the training
    images (augmented_copy, seed c), cached per copy in `cache`, so a 1M catalogue's 16 copies are
    embedded once, and a command stopped midway keeps the copies it did. cache None (a dry run's
    few images): kept in memory for the command instead, which builds several catalogues."""
    from fmnist.utils.atomic import atomic_path

    kept: dict[int, np.ndarray] = {}

    def copy(c: int) -> np.ndarray:
        if cache is None and c in kept:
            return kept[c]
        f = cache / f"copy-{c}.npy" if cache else None
        if f and f.exists():
            v = np.load(f)
            if v.shape == (len(train_images), embedder.dim):
                return v
        t = time.perf_counter()
        v = embedder.embed_images(augmented_copy(train_images, c))
        log.info(f"embedded augmented copy {c} of the {len(v):,} training images in {time.perf_counter() - t:.0f} s")
        if f:
            f.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(f) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, v)
        else:
            kept[c] = v
        return v
    return copy


def catalogue_vectors(train: np.ndarray, n: int, spread: float | None = None, copies=None) -> np.ndarray:
    """(n, dim) float32 unit rows: the training images' embeddings, then copies. copies(c): the
    embeddings of augmented copy c (embedded_copies). Without it, the training embeddings moved
    in embedding space as far as a real augmented copy moves (`spread`, the mean cosine distance
    from augmentation_spread): the same near-duplicate structure around each item in seconds
    instead of minutes (copy c: noise from seed c, reproducible)."""
    if n <= len(train):
        return np.ascontiguousarray(train[:n])
    d = train.shape[1]
    if copies is not None:
        out = np.empty((n, d), np.float32)
        out[:len(train)] = train
        for c, at in enumerate(range(len(train), n, len(train)), start=1):
            take = min(len(train), n - at)
            out[at:at + take] = copies(c)[:take]
        return out
    # A unit vector plus isotropic noise of per-number sd s: cosine ~ 1 / sqrt(1 + d s^2).
    cos = 1.0 - float(spread)
    s = np.sqrt((1.0 / cos ** 2 - 1.0) / d)
    out = np.empty((n, d), np.float32)
    out[:len(train)] = train
    for c, at in enumerate(range(len(train), n, len(train)), start=1):
        take = min(len(train), n - at)
        v = train[:take] + np.random.default_rng(c).standard_normal((take, d), dtype=np.float32) * s
        out[at:at + take] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


# ---------------------------------------------------------------------------- helpers

def exact_search(q: np.ndarray, c: np.ndarray, k: int, metric: str = "ip") -> np.ndarray:
    """(len(q), k) ids of the exact k nearest rows of c: by inner product, or by L2 distance."""
    qt, ct = torch.from_numpy(np.ascontiguousarray(q, np.float32)), torch.from_numpy(np.ascontiguousarray(c, np.float32))
    cn = (ct * ct).sum(1) if metric == "l2" else None
    out = []
    step = max(1, min(500, 50_000_000 // len(ct)))   # a (step, len(c)) score block of at most 200 MB
    for i in range(0, len(qt), step):
        s = qt[i:i + step] @ ct.T
        if cn is not None:
            s = 2 * s - cn            # -|q - c|^2 + |q|^2: same order
        out.append(s.topk(k, 1).indices)
    return torch.cat(out).numpy()


def class_retrieval(ids: np.ndarray, query_labels: np.ndarray, catalogue_labels: np.ndarray) -> dict:
    """precision@10 (share of the 10 nearest of the query's class) and mAP@100 (average precision
    over the 100 nearest, each relevant rank's precision averaged), both means over the queries."""
    rel = (catalogue_labels[ids] == query_labels[:, None]).astype(np.float64)     # (Q, 100)
    prec = rel.cumsum(1) / np.arange(1, rel.shape[1] + 1)
    ap = (prec * rel).sum(1) / np.maximum(rel.sum(1), 1)
    return {"precision_at_10": float(rel[:, :10].mean()), "map_at_100": float(ap.mean())}


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def _ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "n": len(a)}


def time_queries(engine, q: np.ndarray, k: int = 10, batch: int = 1, threads: int = 1) -> dict:
    """Wall time per call of engine.search on `batch` queries at a time, on `threads` threads."""
    batch = min(batch, len(q))
    engine.search(q[:batch], k, threads=threads)   # warm-up: first touch of the index pages
    times, cpu = [], []
    for i in range(0, len(q) - batch + 1, batch):
        t, c = time.perf_counter(), time.thread_time()
        engine.search(q[i:i + batch], k, threads=threads)
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    out = _ms(times)
    out["batch"] = batch
    out["per_query_ms"] = out["mean_ms"] / batch
    if threads == 1:
        # The search's own CPU time (it runs in this thread): wall time also holds the moments
        # the OS gave the core to another process, on a machine shared as this one is.
        out["cpu"] = _ms(cpu)
    return out


def loaded_bytes(engine_name: str, path: Path, dim: int) -> int:
    """Resident memory an index file takes once loaded, in a fresh process (this one's heap
    reuses freed memory, so its growth says little)."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from pathlib import Path\n"
            "from fmnist.search.index import EngineSettings, engine_class\n"
            "cls = engine_class(sys.argv[1])\n"
            "cls.version()\n"   # the engine's library imported before the first reading
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            "before = rss()\n"
            "e = cls.load(Path(sys.argv[2]), int(sys.argv[3]), EngineSettings())\n"
            "print(rss() - before)\n")
    r = subprocess.run([sys.executable, "-c", code, engine_name, str(path), str(dim)], capture_output=True,
                       text=True, check=True)
    return int(r.stdout.strip())


def build_engine(name: str, vectors: np.ndarray, settings, threads: int) -> tuple[object, float]:
    """-> (engine, build seconds)."""
    from fmnist.search.index import engine_class

    gc.collect()
    engine = engine_class(name)(vectors.shape[1], settings)
    t = time.perf_counter()
    for i in range(0, len(vectors), 100_000):   # in steps, as `fmnist index add` would grow it
        engine.add(vectors[i:i + 100_000], threads=threads)
    return engine, time.perf_counter() - t


# ---------------------------------------------------------------------------- parts

def ef_sweep(engine, q: np.ndarray, truth: np.ndarray, s, efs=(16, 32, 64, 128, 256)) -> list[dict]:
    """Recall@10 and one-query latency (wall and search CPU, one thread) at each ef_search: the
    trade-off behind the default, and engines compared at equal recall."""
    from fmnist.search.index import EngineSettings

    out = []
    for ef in efs:
        engine.settings = EngineSettings(s.M, s.ef_construction, ef)
        _, ids = engine.search(q, 10, threads=1)
        t = time_queries(engine, q, batch=1, threads=1)
        out.append({"ef_search": ef, "recall_at_10": recall_at(ids, truth), "p50_ms": t["p50_ms"],
                    "p99_ms": t["p99_ms"], "cpu_p50_ms": t["cpu"]["p50_ms"], "cpu_p99_ms": t["cpu"]["p99_ms"]})
    engine.settings = s
    return out


MILVUS_TIMED_QUERIES = 300   # Milvus Lite answers in ~0.1 s at 100k items: 300 one-query calls, not 1,000


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def database_engine(name: str, vectors: np.ndarray, q: np.ndarray, truth: np.ndarray, s, d: Path) -> dict:
    """An engine that keeps its vectors in a database (milvus): a Milvus Lite database in `d`,
    grown as `fmnist index add` grows it; recall from one call with every query, latency from
    one-query calls. Its server runs in this process's threads, so the calling thread's CPU
    time says nothing of the search's (left out), and neither does this process's memory."""
    from fmnist.search.index import engine_class

    cls = engine_class(name)
    engine = cls.create(d, vectors.shape[1], s)
    t = time.perf_counter()
    for i in range(0, len(vectors), STEP):
        engine.add(vectors[i:i + STEP])
    secs = time.perf_counter() - t
    # Sealed and indexed, as `fmnist serve` finds the database once the build's process closed it
    # (Milvus Lite searches rows still in memory one by one).
    engine.client.flush(engine.collection)
    _, ids = engine.search(q, 10)
    one = time_queries(engine, q[:MILVUS_TIMED_QUERIES], batch=1)
    one.pop("cpu", None)
    return {"version": cls.version(), "server": engine.location()["server"], "build_s": secs,
            "memory_bytes": None, "disk_bytes": dir_bytes(d), "recall_at_10": recall_at(ids, truth),
            "one_query": one}


ENGINES = ("faiss", "usearch", "milvus")


def engines_part(embedder, ds, train: np.ndarray, spread: float, n: int = 100_000, queries: int = 1000,
                 threads: int = 0, names=ENGINES, copies=None) -> dict:
    """FAISS against usearch (and Milvus Lite): the same HNSW settings, the same vectors and queries."""
    import tempfile

    from fmnist.search.index import EngineSettings, engine_class

    vectors = catalogue_vectors(train, n, spread, copies)
    q = embedder.embed_images(ds.test_images[:queries])
    truth = exact_search(q, vectors, 10)
    s = EngineSettings()
    out = {"catalogue": n, "real_items": min(n, len(train)), "copies": _copies_name(n, len(train), copies),
           "queries": queries, "settings": s.__dict__, "engines": {}}
    for name in names:
        if engine_class(name).ext is None:
            with tempfile.TemporaryDirectory() as d:
                out["engines"][name] = database_engine(name, vectors, q, truth, s, Path(d))
            log.info(f"engines: {name}: build {out['engines'][name]['build_s']:.1f} s, recall@10 "
                     f"{out['engines'][name]['recall_at_10']:.4f}, p99 {out['engines'][name]['one_query']['p99_ms']:.1f} ms")
            continue
        engine, secs = build_engine(name, vectors, s, threads or os.cpu_count())
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / f"index.{engine.ext}"
            engine.save(f)
            disk = f.stat().st_size
            mem = loaded_bytes(name, f, vectors.shape[1])
        _, ids = engine.search(q, 10, threads=1)
        out["engines"][name] = {"version": engine_class(name).version(), "build_s": secs, "memory_bytes": mem,
                                "disk_bytes": disk, "recall_at_10": recall_at(ids, truth),
                                "one_query": time_queries(engine, q, batch=1),
                                "ef_search_sweep": ef_sweep(engine, q, truth, s)}
        log.info(f"engines: {name}: build {secs:.1f} s, recall@10 {out['engines'][name]['recall_at_10']:.4f}, "
                 f"p99 {out['engines'][name]['one_query']['p99_ms']:.3f} ms")
        del engine
        gc.collect()
    return out


def merge_engines(old: dict, new: dict) -> dict:
    """The engines entry after a run of some engines: theirs replace their own rows, each with its
    own environment, beside the rest, when both runs measured the same catalogue, queries,
    settings and model; otherwise (or a run of every engine) the new entry alone."""
    same = ("catalogue", "real_items", "queries", "settings", "model")
    if set(new["engines"]) == set(ENGINES) or any(old.get(k) != new.get(k) for k in same):
        return new
    merged = {**old, "engines": dict(old["engines"])}
    for name, r in new["engines"].items():
        merged["engines"][name] = {**r, "environment": new["environment"]}
    return merged


def quality_part(embedder, ds, train: np.ndarray, photos: int = 1000, n_test: int = 0) -> dict:
    """Same-class retrieval against two baselines, and the same item found from its photo.
    train: the embeddings of the first len(train) training images (the catalogue); n_test: the
    first test images only (0: all; a dry run's small sizes)."""
    from fmnist.photos import render_product_photo

    train_images = ds.train_images[:len(train)]
    test_images = ds.test_images[:n_test or None]
    t = time.perf_counter()
    test = embedder.embed_images(test_images)
    embed_s = time.perf_counter() - t
    ytr, yte = ds.train_labels[:len(train)].numpy(), ds.test_labels[:len(test)].numpy()
    out = {"catalogue": len(train), "queries": len(test), "dim": embedder.dim,
           "embedding_ms_per_image_batch128": 1000 * embed_s / len(test)}
    out["embedding"] = class_retrieval(exact_search(test, train, 100), yte, ytr)
    px_tr = train_images.flatten(1).float().div(255).numpy()
    px_te = test_images.flatten(1).float().div(255).numpy()
    out["baseline_pixels"] = class_retrieval(exact_search(px_te, px_tr, 100, "l2"), yte, ytr)
    # PCA fitted on the catalogue (the training images), to the embedding's dimension
    mu = px_tr.mean(0)
    _, _, v = torch.pca_lowrank(torch.from_numpy(px_tr - mu), q=embedder.dim, center=False, niter=4)
    v = v.numpy()
    out["baseline_pca"] = class_retrieval(exact_search((px_te - mu) @ v, (px_tr - mu) @ v, 100, "l2"), yte, ytr)
    log.info(f"quality: precision@10 {out['embedding']['precision_at_10']:.4f} (pixels "
             f"{out['baseline_pixels']['precision_at_10']:.4f}, PCA {out['baseline_pca']['precision_at_10']:.4f})")

    # The same item from a photo: test image i rendered as a product photo, converted as
    # `fmnist predict` converts it, against the training images plus all 10,000 test originals.
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(test), photos, replace=False))
    catalogue = np.concatenate([train, test])
    conv, images = [], []
    for i in pick:
        jpeg = render_product_photo(test_images[int(i)].numpy(), np.random.default_rng(int(i)))
        t = time.perf_counter()
        images.append(embedder.prepare(jpeg).image)
        conv.append(time.perf_counter() - t)
    t = time.perf_counter()
    q = embedder.embed_images(np.stack(images))
    embed_photo_s = time.perf_counter() - t
    ids = exact_search(q, catalogue, 10)
    target = (len(train) + pick)[:, None]
    out["same_item"] = {"photos": photos, "catalogue": len(catalogue), "renderer": "photos.render_product_photo",
                        "top1": float((ids[:, :1] == target).any(1).mean()),
                        "top10": float((ids == target).any(1).mean()),
                        "conversion": _ms(conv),
                        "embedding_ms_per_photo_batch": 1000 * embed_photo_s / photos}
    log.info(f"quality: same item from its photo: top-1 {out['same_item']['top1']:.3f}, "
             f"top-10 {out['same_item']['top10']:.3f}")
    return out


STEP = 100_000         # items added per engine.add call, as `fmnist index add` would grow an index
BUILD_BUDGET_S = 420   # adding past this, a command saves the index and stops: the next command goes on


def build_in_steps(name: str, vectors: np.ndarray, settings, threads: int, state: Path):
    """Add `vectors` to a new index STEP items at a time. A build that runs past BUILD_BUDGET_S is
    saved to `state` (the index file and the seconds spent) and continued by the next command,
    so no command holds the bench lock much past 10 minutes: one index grown by adding, which is
    also how a catalogue grows. -> (engine, total seconds of adding, seconds per step), or None
    when not done."""
    import json

    from fmnist.utils.atomic import atomic_path, write_json
    from fmnist.search.index import engine_class

    cls = engine_class(name)
    meta, index_file = state.with_suffix(".json"), state.with_suffix("." + cls.ext)
    done = json.loads(meta.read_text()) if meta.exists() and index_file.exists() else {"added": 0, "step_s": []}
    engine = cls.load(index_file, vectors.shape[1], settings) if done["added"] else cls(vectors.shape[1], settings)
    start = time.perf_counter()
    for i in range(done["added"], len(vectors), STEP):
        t = time.perf_counter()
        engine.add(vectors[i:i + STEP], threads=threads)
        done["step_s"].append(time.perf_counter() - t)
        done["added"] = min(len(vectors), i + STEP)
        if done["added"] < len(vectors) and time.perf_counter() - start > BUILD_BUDGET_S:
            with atomic_path(index_file) as tmp:
                engine.save(tmp)
            write_json(meta, done)
            log.warning(f"built {done['added']:,} of {len(vectors):,} items in this command ({sum(done['step_s']):.0f} s "
                        f"of adding so far); run the same command again to go on")
            return None
    meta.unlink(missing_ok=True)
    index_file.unlink(missing_ok=True)
    return engine, sum(done["step_s"]), done["step_s"]


def _copies_name(n: int, real: int, copies) -> str | None:
    """What the catalogue's items past the training images are (None: there are none)."""
    if n <= real:
        return None
    return "embedded augmented copies" if copies is not None else "moved training embeddings"


def scale_part(embedder, ds, train: np.ndarray, spread: float, n: int, queries: int = 1000, threads: int = 0,
               cache: Path | None = None, copies=None) -> dict | None:
    """One catalogue size with the default engine: build, size, latency, recall against exact.
    None: the build goes on in the next command (build_in_steps)."""
    import tempfile

    from fmnist.search.index import DEFAULT_ENGINE, EngineSettings

    vectors = catalogue_vectors(train, n, spread, copies)
    s = EngineSettings()
    threads = threads or os.cpu_count()
    kind = "-embedded" if n > len(train) and copies is not None else ""   # a build in steps goes on with its own vectors
    state = (cache or Path(tempfile.gettempdir())) / f"build-{DEFAULT_ENGINE}-{n}{kind}-M{s.M}-efc{s.ef_construction}"
    built = build_in_steps(DEFAULT_ENGINE, vectors, s, threads, state)
    if built is None:
        return None
    engine, secs, steps = built
    q = embedder.embed_images(ds.test_images[:queries])
    t = time.perf_counter()
    truth = exact_search(q, vectors, 10)
    exact_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"index.{engine.ext}"
        t = time.perf_counter()
        engine.save(f)
        save_s = time.perf_counter() - t
        disk = f.stat().st_size
        mem = loaded_bytes(DEFAULT_ENGINE, f, vectors.shape[1])
    out = {"items": n, "real_items": min(n, len(train)), "copies": _copies_name(n, len(train), copies),
           "engine": DEFAULT_ENGINE, "engine_version": engine.version(), "settings": s.__dict__,
           "dim": int(vectors.shape[1]), "vectors_bytes": int(vectors.nbytes), "build_threads": threads,
           "build_s": secs, "build_step_s": steps, "save_s": save_s, "disk_bytes": disk, "memory_bytes": mem, "queries": queries,
           "exact_search_ms_per_query_all_threads": 1000 * exact_s / queries}
    _, ids = engine.search(q, 10, threads=1)
    out["recall_at_10"] = recall_at(ids, truth)
    out["one_query_one_thread"] = time_queries(engine, q, batch=1, threads=1)
    out["batches_one_thread"] = [time_queries(engine, q, batch=b, threads=1) for b in (32, 256)]
    out["batch_256_all_threads"] = time_queries(engine, q, batch=256, threads=threads)
    out["ef_search_sweep"] = ef_sweep(engine, q, truth, s)
    log.info(f"scale {n}: build {secs:.1f} s, {disk / 1e6:.0f} MB on disk, recall@10 {out['recall_at_10']:.4f}, "
             f"one query p99 {out['one_query_one_thread']['p99_ms']:.3f} ms")
    return out


def run(args, env: dict) -> dict:
    """`fmnist bench search`: the parts asked for, each merged into OUT/search.json when done."""
    import json

    from fmnist import data
    from fmnist.utils.atomic import write_json
    from fmnist.search.embed import Embedder

    out = Path(args.out) / "search.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    parts = [p.strip() for p in args.search_parts.split(",") if p.strip()]
    bad = set(parts) - {"engines", "quality", "scale"}
    if bad:
        raise ValueError(f"unknown search part(s) {', '.join(sorted(bad))}; choose from engines, quality, scale")
    embedder = Embedder(args.checkpoint)
    ds = data.load()
    cache = data.cache_dir() / "search-bench"
    import importlib.metadata

    names = [e.strip() for e in getattr(args, "search_engines", ",".join(ENGINES)).split(",") if e.strip()]
    if set(names) - set(ENGINES) or not names:
        raise ValueError(f"--search-engines {','.join(names)}: choose from {', '.join(ENGINES)}")
    versions = {}
    for pkg in ("faiss-cpu", "usearch", "pymilvus", "milvus-lite"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg.replace("-cpu", "").replace("-", "_")] = importlib.metadata.version(pkg)
    # The load average: this machine's two cores are shared, and timings say more beside it.
    stamp = {"environment": {**env, **versions, "load_average_1_5_15_min_at_start": list(os.getloadavg())},
             "model": embedder.model_record}
    doc.setdefault("command", "fmnist bench search --out DIR [--search-parts ...] [--sizes ...]")
    dry = getattr(args, "dry_run", False)
    images = ds.train_images[:1000] if dry else ds.train_images
    train = train_vectors(embedder, images, cache)
    model_cache = cache / embedder.model_record["weights_sha256"][:16]
    how = getattr(args, "copies", "embedded")
    if how not in ("embedded", "moved"):
        raise ValueError(f"--copies {how}: choose embedded or moved")
    copies = embedded_copies(embedder, images, None if dry else model_cache) if how == "embedded" else None
    sizes = [1500] if dry else [int(x) for x in args.sizes.split(",")]
    spread = None
    if ("engines" in parts or "scale" in parts) and max(sizes + [0 if dry else 100_000]) > len(train):
        prev = doc.get("augmentation_spread", {})
        if dry or prev.get("model") != embedder.model_record:
            doc["augmentation_spread"] = {**stamp, **augmentation_spread(embedder, ds.train_images,
                                                                         n=100 if dry else 2000)}
            write_json(out, doc)
        # The model's recorded spread otherwise: a measurement split over commands (or an engine
        # measured again) builds its catalogue from the same vectors as the entries beside it.
        spread = doc["augmentation_spread"]["mean_cosine_distance"]
    if "engines" in parts:
        new = engines_part(embedder, ds, train, spread, n=1500 if dry else 100_000, queries=20 if dry else 1000,
                           threads=args.threads, names=names, copies=copies)
        doc["engines"] = merge_engines(doc.get("engines", {}), {**stamp, **new})
        write_json(out, doc)
    if "quality" in parts:
        doc["quality"] = {**stamp, **quality_part(embedder, ds, train, **(
            {"photos": 10, "n_test": 100} if dry else {}))}
        write_json(out, doc)
    if "scale" in parts:
        for n in sizes:
            r = scale_part(embedder, ds, train, spread, n, queries=20 if dry else 1000, threads=args.threads,
                           cache=model_cache, copies=copies)
            if r is None:
                break
            doc.setdefault("scale", {})[str(n)] = {**stamp, **r}
            write_json(out, doc)
    log.info(f"wrote {out}")
    return doc
