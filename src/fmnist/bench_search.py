"""`fmnist bench search`: how well and how fast visual search works, written to JSON as it goes.

  engines   FAISS HNSW against usearch HNSW on one catalogue of real embeddings: build time, query
            p50/p99, recall@10 against exact search (the measurement behind the default engine)
  quality   Fashion-MNIST test images as queries against the 60,000 training images: same-class
            precision@10 and mAP@100, beside raw pixels and PCA of the pixels to the embedding's
            dimension (exact search for all three); and the same item from a photo: 1,000 test
            images rendered as product photos (photos.py), converted as `fmnist predict` converts,
            queried against a catalogue of the training images plus the 10,000 test originals
  scale     catalogues of 10k, 100k and 1M items (the training images, then augmented copies of
            them: shifted up to 2 px, mirrored, half with a rectangle erased): build time, size on
            disk and in memory, query latency of the index alone on one thread (one query and
            batches), recall@10 against exact search; embedding and conversion timed apart

Each catalogue size is its own entry of OUT/search.json, written when it is done, so a long
sitting can be split over several commands (--sizes). The augmented copies' embeddings are
cached in ~/.cache/fmnist/search-bench/, keyed by the model's weights.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json

log = logging.getLogger(__name__)

CHUNK = 60_000   # augmented copies are made and cached one training set's worth at a time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def augmented_copy(images: torch.Tensor, copy: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> the same images shifted up to 2 px each way, half mirrored, half with
    a rectangle erased; copy c of the catalogue uses generator seed c, so it is reproducible."""
    from .augment import erase, flip, translate

    g = torch.Generator().manual_seed(copy)
    x = images.unsqueeze(1).float()
    x = erase(flip(translate(x, 2, g), g), 0.5, g)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def catalogue_vectors(embedder, train_images: torch.Tensor, n: int, cache: Path) -> np.ndarray:
    """(n, dim) float32: the training images' embeddings, then augmented copies' (cached per copy)."""
    from tqdm import tqdm

    cache = cache / embedder.model_record["weights_sha256"][:16]
    cache.mkdir(parents=True, exist_ok=True)
    parts, have = [], 0
    copies = -(-n // len(train_images))
    for c in tqdm(range(copies), desc="catalogue embeddings", unit="copy", disable=None if copies > 1 else True,
                  leave=False):
        f = cache / f"copy-{c:03d}.npy"
        take = min(len(train_images), n - have)
        v = np.load(f, mmap_mode="r") if f.exists() else None
        if v is not None and v.shape != (len(train_images), embedder.dim):
            log.warning(f"{f}: {v.shape} is not one copy of the training images' embeddings; embedding again")
            v = None
        if v is None:
            imgs = train_images if c == 0 else augmented_copy(train_images, c)
            if take < len(imgs):   # part of a copy (a small sitting): embedded, not cached
                v = embedder.embed_images(imgs[:take])
            else:
                t = time.perf_counter()
                v = embedder.embed_images(imgs)
                log.info(f"embedded copy {c} of the training images: {len(v)} in {time.perf_counter() - t:.0f} s")
                from .atomic import atomic_path
                with atomic_path(f) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, v)
        parts.append(np.asarray(v[:take]))
        have += take
    return np.concatenate(parts)


# ---------------------------------------------------------------------------- helpers

def exact_search(q: np.ndarray, c: np.ndarray, k: int, metric: str = "ip") -> np.ndarray:
    """(len(q), k) ids of the exact k nearest rows of c: by inner product, or by L2 distance."""
    qt, ct = torch.from_numpy(np.ascontiguousarray(q, np.float32)), torch.from_numpy(np.ascontiguousarray(c, np.float32))
    cn = (ct * ct).sum(1) if metric == "l2" else None
    out = []
    for i in range(0, len(qt), 500):
        s = qt[i:i + 500] @ ct.T
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
    times = []
    for i in range(0, len(q) - batch + 1, batch):
        t = time.perf_counter()
        engine.search(q[i:i + batch], k, threads=threads)
        times.append(time.perf_counter() - t)
    out = _ms(times)
    out["batch"] = batch
    out["per_query_ms"] = out["mean_ms"] / batch
    return out


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def build_engine(name: str, vectors: np.ndarray, settings, threads: int) -> tuple[object, float, int]:
    """-> (engine, build seconds, resident bytes the build added)."""
    from .search_index import engine_class

    gc.collect()
    rss = _rss_bytes()
    engine = engine_class(name)(vectors.shape[1], settings)
    t = time.perf_counter()
    for i in range(0, len(vectors), 100_000):   # in steps, as `fmnist index add` would grow it
        engine.add(vectors[i:i + 100_000], threads=threads)
    return engine, time.perf_counter() - t, _rss_bytes() - rss


# ---------------------------------------------------------------------------- parts

def engines_part(embedder, ds, cache: Path, n: int = 100_000, queries: int = 1000, threads: int = 0) -> dict:
    """FAISS against usearch: the same HNSW settings, the same vectors and queries."""
    import tempfile

    from .search_index import EngineSettings, engine_class

    vectors = catalogue_vectors(embedder, ds.train_images, n, cache)
    q = embedder.embed_images(ds.test_images[:queries])
    truth = exact_search(q, vectors, 10)
    s = EngineSettings()
    out = {"catalogue": n, "queries": queries, "settings": s.__dict__, "engines": {}}
    for name in ("faiss", "usearch"):
        engine, secs, mem = build_engine(name, vectors, s, threads or os.cpu_count())
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / f"index.{engine.ext}"
            engine.save(f)
            disk = f.stat().st_size
        _, ids = engine.search(q, 10, threads=1)
        out["engines"][name] = {"version": engine_class(name).version(), "build_s": secs, "memory_bytes": mem,
                                "disk_bytes": disk, "recall_at_10": recall_at(ids, truth),
                                "one_query": time_queries(engine, q, batch=1)}
        log.info(f"engines: {name}: build {secs:.1f} s, recall@10 {out['engines'][name]['recall_at_10']:.4f}, "
                 f"p99 {out['engines'][name]['one_query']['p99_ms']:.3f} ms")
        del engine
        gc.collect()
    return out


def quality_part(embedder, ds, cache: Path, photos: int = 1000, n_train: int = 0, n_test: int = 0) -> dict:
    """Same-class retrieval against two baselines, and the same item found from its photo.
    n_train, n_test: the first images of each split only (0: all; a dry run's small sizes)."""
    from .photos import render_product_photo

    train_images = ds.train_images[:n_train or None]
    test_images = ds.test_images[:n_test or None]
    train = catalogue_vectors(embedder, ds.train_images, len(train_images), cache)
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


def scale_part(embedder, ds, cache: Path, n: int, queries: int = 1000, threads: int = 0) -> dict:
    """One catalogue size with the default engine: build, size, latency, recall against exact."""
    import tempfile

    from .search_index import DEFAULT_ENGINE, EngineSettings

    vectors = catalogue_vectors(embedder, ds.train_images, n, cache)
    q = embedder.embed_images(ds.test_images[:queries])
    s = EngineSettings()
    threads = threads or os.cpu_count()
    t = time.perf_counter()
    truth = exact_search(q, vectors, 10)
    exact_s = time.perf_counter() - t
    engine, secs, mem = build_engine(DEFAULT_ENGINE, vectors, s, threads)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"index.{engine.ext}"
        t = time.perf_counter()
        engine.save(f)
        save_s = time.perf_counter() - t
        disk = f.stat().st_size
    out = {"items": n, "engine": DEFAULT_ENGINE, "engine_version": engine.version(), "settings": s.__dict__,
           "dim": int(vectors.shape[1]), "vectors_bytes": int(vectors.nbytes), "build_threads": threads,
           "build_s": secs, "save_s": save_s, "disk_bytes": disk, "memory_bytes": mem, "queries": queries,
           "exact_search_ms_per_query_all_threads": 1000 * exact_s / queries}
    _, ids = engine.search(q, 10, threads=1)
    out["recall_at_10"] = recall_at(ids, truth)
    out["one_query_one_thread"] = time_queries(engine, q, batch=1, threads=1)
    out["batches_one_thread"] = [time_queries(engine, q, batch=b, threads=1) for b in (32, 256)]
    out["batch_256_all_threads"] = time_queries(engine, q, batch=256, threads=threads)
    sweep = []
    for ef in (16, 32, 64, 128, 256):   # the latency/recall trade-off behind the default ef_search
        engine.settings = EngineSettings(s.M, s.ef_construction, ef)
        _, ids = engine.search(q, 10, threads=1)
        sweep.append({"ef_search": ef, "recall_at_10": recall_at(ids, truth),
                      **{k: v for k, v in time_queries(engine, q, batch=1, threads=1).items()
                         if k in ("p50_ms", "p99_ms")}})
    out["ef_search_sweep"] = sweep
    log.info(f"scale {n}: build {secs:.1f} s, {disk / 1e6:.0f} MB on disk, recall@10 {out['recall_at_10']:.4f}, "
             f"one query p99 {out['one_query_one_thread']['p99_ms']:.3f} ms")
    return out


def run(args, env: dict) -> dict:
    """`fmnist bench search`: the parts asked for, each merged into OUT/search.json when done."""
    import json

    from . import data
    from .atomic import write_json
    from .embed import Embedder

    out = Path(args.out) / "search.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    parts = [p.strip() for p in args.search_parts.split(",") if p.strip()]
    bad = set(parts) - {"engines", "quality", "scale"}
    if bad:
        raise ValueError(f"unknown search part(s) {', '.join(sorted(bad))}; choose from engines, quality, scale")
    embedder = Embedder(args.checkpoint)
    ds = data.load()
    cache = data.cache_dir() / "search-bench"
    import faiss
    import usearch
    stamp = {"environment": {**env, "faiss": faiss.__version__, "usearch": usearch.__version__},
             "model": embedder.model_record}
    doc.setdefault("command", "fmnist bench search --out DIR [--search-parts ...] [--sizes ...]")
    dry = getattr(args, "dry_run", False)
    if "engines" in parts:
        doc["engines"] = {**stamp, **engines_part(embedder, ds, cache, n=3000 if dry else 100_000,
                                                  queries=50 if dry else 1000, threads=args.threads)}
        write_json(out, doc)
    if "quality" in parts:
        doc["quality"] = {**stamp, **quality_part(embedder, ds, cache, **(
            {"photos": 20, "n_train": 2000, "n_test": 200} if dry else {}))}
        write_json(out, doc)
    if "scale" in parts:
        for n in ([2000] if dry else [int(x) for x in args.sizes.split(",")]):
            doc.setdefault("scale", {})[str(n)] = {**stamp, **scale_part(embedder, ds, cache, n,
                                                                         queries=50 if dry else 1000,
                                                                         threads=args.threads)}
            write_json(out, doc)
    log.info(f"wrote {out}")
    return doc
