"""Visual search: "more like this" from a photo, over a catalogue index (index.py).

    from fmnist.search import build_index, similar
    build_index("fashion-mnist:train", "catalogue/")          # or a folder of product photos
    similar(["shoe.jpg"], "catalogue/", k=8)[0].neighbours     # [Neighbour(id, distance, ...), ...]

A catalogue SOURCE is a folder of photos (labels from its manifest.csv where it has one), a photo
set by name (found in $FMNIST_PHOTOS or the cache, as `fmnist photos fetch` puts it), or `fashion-mnist:train` / `:test`, the
dataset itself as a demo catalogue. Photos are converted as `fmnist predict` converts them.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist.classes import CLASS_NAMES
from fmnist.inference.predict import as_items, item_name
from fmnist.search.embed import Embedder
from fmnist.photos.preprocess import PreprocessError, iter_image_files, open_image
from fmnist.search.index import DEFAULT_ENGINE, CatalogueIndex, EngineSettings, Neighbour

log = logging.getLogger(__name__)

DATASET_PREFIX = "fashion-mnist:"
THUMB = 64          # photo thumbnails: 64x64 RGB, the photo letterboxed on white (12 KB raw each)
BATCH = 512         # items converted and embedded between progress updates


@dataclass
class Source:
    """What a SOURCE argument names: `count` items, produced in batches by `batches()`."""
    name: str
    count: int
    batches: object     # () -> iterator of (images (n, 28, 28), items [dict], thumbs (n, ...)) batches
    skipped: list[str] = field(default_factory=list)   # photos that could not be converted, with why


def photo_thumbnail(img) -> np.ndarray:
    """A PIL image -> (THUMB, THUMB, 3) uint8, the whole photo fitted on a white square."""
    from PIL import Image

    im = img.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    canvas.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _manifest_labels(folder: Path) -> dict[str, str]:
    """file -> label from a photo set's manifest.csv, where the folder has one."""
    man = folder / "manifest.csv"
    if not man.is_file():
        return {}
    with man.open(newline="", encoding="utf-8") as f:
        return {r["file"]: r["label"] for r in csv.DictReader(f)
                if r.get("file") and r.get("label") in CLASS_NAMES}


def resolve_source(source: str, embedder: Embedder, limit: int | None = None, data_dir=None) -> Source:
    if source.startswith(DATASET_PREFIX):
        return _dataset_source(source, limit, data_dir)
    folder = Path(source)
    if not folder.is_dir():
        from fmnist.photos import sets  # a photo set by name, found as every command finds one

        if "/" in source or source not in sets.names():
            raise ValueError(f"catalogue source {source!r}: not a folder, nor a photo set ({', '.join(sets.names())}); "
                             f"pass a folder of photos, a photo set's name, or {DATASET_PREFIX}train")
        folder = sets.resolve(source).folder
    return _folder_source(folder, embedder, limit)


def _dataset_source(source: str, limit: int | None, data_dir) -> Source:
    from fmnist import data

    split = source[len(DATASET_PREFIX):]
    if split not in ("train", "test"):
        raise ValueError(f"catalogue source {source!r}: use {DATASET_PREFIX}train or {DATASET_PREFIX}test")
    ds = data.load(data_dir)
    images = (ds.train_images if split == "train" else ds.test_images).numpy()
    labels = (ds.train_labels if split == "train" else ds.test_labels).numpy()
    n = len(images) if limit is None else min(limit, len(images))

    def batches():
        for i in range(0, n, BATCH):
            j = min(n, i + BATCH)
            items = [{"source": f"{source}#{t}", "label": CLASS_NAMES[int(labels[t])]} for t in range(i, j)]
            # A dataset image is its own thumbnail: 784 bytes, the picture the model sees.
            yield images[i:j], items, images[i:j]
    return Source(source, n, batches)


def _folder_source(folder: Path, embedder: Embedder, limit: int | None) -> Source:
    files = iter_image_files([folder])
    if not files:
        raise ValueError(f"catalogue source {folder}: no image files in it")
    files = files[:limit] if limit is not None else files
    labels = _manifest_labels(folder)
    src = Source(str(folder), len(files), None)

    def batches():
        for i in range(0, len(files), BATCH // 8):   # a photo's conversion takes ~0.1-1 s: smaller steps
            imgs, items, thumbs = [], [], []
            for f in files[i:i + BATCH // 8]:
                rel = f.relative_to(folder).as_posix()
                try:
                    img = open_image(f, draft=embedder.predictor.draft_size())
                    pre = embedder.prepare(img)
                except PreprocessError as e:
                    src.skipped.append(str(e))
                    log.warning(f"skipped: {e}")
                    continue
                imgs.append(pre.image)
                items.append({"source": f"{folder.name}/{rel}", "label": labels.get(rel)})
                thumbs.append(photo_thumbnail(img))
            if imgs:
                yield np.stack(imgs), items, np.stack(thumbs)
    src.batches = batches
    return src


def _embed_source(src: Source, embedder: Embedder) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Every item of a source: its vector, {source, label, predicted} and thumbnail."""
    from tqdm import tqdm

    vecs, items, thumbs = [], [], []
    show = log.isEnabledFor(logging.INFO)
    with tqdm(total=src.count, desc=f"indexing {src.name}", unit="item", disable=None if show else True,
              leave=False) as bar:
        for imgs, its, th in src.batches():
            vecs.append(embedder.embed_images(imgs))
            # The model's class, shown for items the catalogue gives no label (a labelled
            # catalogue, the dataset's, skips this second forward pass).
            unlabelled = [i for i, it in enumerate(its) if not it.get("label")]
            probs = embedder.predictor.probabilities(imgs[unlabelled]) if unlabelled else []
            for i, p in zip(unlabelled, probs):
                its[i]["predicted"] = embedder.predictor.class_names[int(np.argmax(p))]
            items += its
            thumbs.append(th)
            bar.update(len(its))
    if not items:
        raise ValueError(f"catalogue source {src.name}: none of its {src.count} photos could be converted "
                         f"({'; '.join(src.skipped[:3])})")
    # Photo chunks hold RGB thumbnails, dataset chunks 28x28 grey: a chunk holds one source.
    return np.concatenate(vecs), items, np.concatenate(thumbs)


def build_index(source: str, out: str | Path, checkpoint: str | Path | None = None, limit: int | None = None,
                engine: str = DEFAULT_ENGINE, settings: EngineSettings | None = None,
                embedder: Embedder | None = None, data_dir=None,
                engine_options: dict | None = None) -> CatalogueIndex:
    """Embed every item of `source` with the model (default: the shipped one) and write a new
    index into directory `out`. engine_options: milvus's {"uri", "collection"} (index.py). -> the
    index, open."""
    embedder = embedder or Embedder(checkpoint)
    src = resolve_source(source, embedder, limit, data_dir)
    # Before embedding: a server that cannot be reached fails now, not after the catalogue's embedding.
    index = CatalogueIndex.create(out, embedder.model_record, engine, settings, engine_options)
    vecs, items, thumbs = _embed_source(src, embedder)
    index.add(vecs, items, thumbs, src.name)
    log.info(f"indexed {len(items)} items of {src.name} into {out} ({index.engine_name})"
             + (f"; {len(src.skipped)} photo(s) skipped" if src.skipped else ""))
    return index


def add_to_index(source: str, index: str | Path, checkpoint: str | Path | None = None, limit: int | None = None,
                 embedder: Embedder | None = None, data_dir=None) -> CatalogueIndex:
    """Add the items of `source` to an existing index (built with the same model)."""
    idx = CatalogueIndex.open(index)
    embedder = embedder or Embedder(checkpoint)
    idx.check_model(embedder.model_record)
    src = resolve_source(source, embedder, limit, data_dir)
    vecs, items, thumbs = _embed_source(src, embedder)
    idx.add(vecs, items, thumbs, src.name)
    log.info(f"added {len(items)} items of {src.name} to {index}: {len(idx)} in all")
    return idx


@dataclass
class SimilarResult:
    source: str
    neighbours: list[Neighbour] = field(default_factory=list)
    image: np.ndarray | None = None        # the 28x28 image the model saw
    label: str | None = None               # the model's class for the query
    probability: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.error:
            return {"source": self.source, "error": self.error}
        return {"source": self.source, "label": self.label, "probability": self.probability,
                "neighbours": [n.to_dict() for n in self.neighbours]}


def query(items, index: CatalogueIndex, embedder: Embedder, k: int = 8) -> list[SimilarResult]:
    """Photos (as Predictor.predict takes them: one or a list) -> their k nearest catalogue items each."""
    index.check_model(embedder.model_record)
    results, images = [], []
    for i, item in enumerate(as_items(items)):
        src = item_name(item, i)
        try:
            pre = embedder.prepare(item)
        except PreprocessError as e:
            results.append(SimilarResult(src, error=str(e)))
            continue
        results.append(SimilarResult(src, image=pre.image))
        images.append(pre.image)
    if images:
        batch = np.stack(images)
        found = index.search(embedder.embed_images(batch), k)
        probs = embedder.predictor.probabilities(batch)
        for r, nb, p in zip([r for r in results if r.ok], found, probs):
            r.neighbours, r.label, r.probability = nb, embedder.predictor.class_names[int(np.argmax(p))], float(p.max())
    return results


def similar(photos, index: str | Path, k: int = 8, checkpoint: str | Path | None = None) -> list[SimilarResult]:
    """The k catalogue items most like each photo: one call, model and index loaded for it."""
    idx = CatalogueIndex.open(index)
    return query(photos, idx, Embedder(checkpoint), k)


def format_results(results: list[SimilarResult]) -> str:
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.source}: error: {r.error}")
            continue
        lines.append(f"{r.source}: looks like {r.label} ({r.probability:.0%}); nearest in the catalogue:")
        lines.append(f"  {'rank':>4}  {'id':>9}  {'class':<13} {'distance':>8}  source")
        for rank, n in enumerate(r.neighbours, 1):
            lines.append(f"  {rank:>4}  {n.id:>9}  {n.shown_class:<13} {n.distance:>8.4f}  {n.source}")
    return "\n".join(lines)


def figure(results: list[SimilarResult], index: CatalogueIndex, path: str | Path, photos: list | None = None) -> None:
    """A picture per query row: the photo, what the model saw, and its neighbours with class and
    distance. `photos`: the query photos (paths or PIL images) to show beside the 28x28 images."""
    from fmnist.evaluation.plots import _plt, _save

    plt = _plt()
    ok = [(r, p) for r, p in zip(results, photos or [None] * len(results)) if r.ok]
    if not ok:
        raise ValueError("no query could be converted: there is nothing to draw")
    k = max(len(r.neighbours) for r, _ in ok)
    fig, axes = plt.subplots(len(ok), k + 2, figsize=(1.3 * (k + 2), 1.55 * len(ok)), squeeze=False)
    for row, (r, photo) in zip(axes, ok):
        for a in row:
            a.axis("off")
        if photo is not None:
            row[0].imshow(photo_thumbnail(open_image(photo) if isinstance(photo, (str, Path)) else photo))
        row[0].set_title(Path(r.source).stem[:20], fontsize=7)
        row[1].imshow(r.image, cmap="gray", vmin=0, vmax=255)
        row[1].set_title(f"model saw\n{r.label}", fontsize=7)
        for a, n in zip(row[2:], r.neighbours):
            t = index.thumbnail(n.id)
            a.imshow(t, cmap="gray" if t.ndim == 2 else None, vmin=0, vmax=255)
            a.set_title(f"{n.shown_class}\n{n.distance:.3f}", fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
