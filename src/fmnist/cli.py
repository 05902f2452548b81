"""Command line: parse, dispatch, turn known failures into one-line errors. No logic here.

Library modules log to `fmnist.*` loggers and never print; the CLI decides what reaches the
terminal: progress and notes (INFO and up) on stderr, a command's result (the predict table,
the evaluation report, the dataset counts) on stdout, so `fmnist ... > file` keeps only results.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from fmnist.training.config import AUGMENT_KEYS, PRESETS, AugmentConfig, TrainConfig
from fmnist.utils.logsetup import setup_logging
from fmnist.utils.malloc import keep_freed_memory

log = logging.getLogger("fmnist.cli")

EXIT_USAGE = 2
EXIT_SIGPIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader left (`| head`)


def _at_least(lo: float, kind=float, strict: bool = False):
    """argparse type: a number >= lo (> lo when strict), refused at parse time with the reason."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}, got {text}")
        return v
    return parse


def _shown(v) -> str:
    return {True: "on", False: "off", None: "off"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def _preset_default(key: str) -> str:
    """The default a train flag shows: one value, or each preset's where they differ."""
    base = TrainConfig()
    if key in AUGMENT_KEYS:
        vals = {name: p.get("augment", {}).get(key, getattr(base.augment, key)) for name, p in PRESETS.items()}
    else:
        vals = {name: p.get(key, getattr(base, key)) for name, p in PRESETS.items()}
    if len(set(map(repr, vals.values()))) == 1:
        return f"default: {_shown(getattr(base.augment, key) if key in AUGMENT_KEYS else getattr(base, key))}"
    return "; ".join(f"{name} {_shown(v)}" for name, v in vals.items())


_TYPES = {"int": int, "float": float, "str": str, "str | None": str}


def _add_config_flags(p) -> None:
    """One flag per TrainConfig (and AugmentConfig) field that carries help: its name, type,
    choices and help come from the dataclass, so a setting is written once."""
    for f in fields(TrainConfig):
        for g in (fields(AugmentConfig) if f.name == "augment" else [f]):
            meta = dict(g.metadata)
            if "help" not in meta:
                continue
            text, name = meta.pop("help"), meta.pop("flag", "--" + g.name.replace("_", "-"))
            shown = meta.pop("shown", None) or _preset_default(g.name)
            kind = {"action": argparse.BooleanOptionalAction} if g.type == "bool" else {"type": _TYPES[g.type]}
            p.add_argument(name, dest=g.name, default=None, help=f"{text} ({shown})", **kind, **meta)


def _flag_name(dest: str) -> str:
    """The train flag that sets TrainConfig field `dest`."""
    f = {f.name: f for f in [*fields(TrainConfig), *fields(AugmentConfig)]}.get(dest)
    return (f.metadata.get("flag") if f else None) or "--" + dest.replace("_", "-")


def train_overrides(args) -> dict:
    """The TrainConfig settings given on the command line (None = not given)."""
    names = [f.name for f in fields(TrainConfig) if f.name != "augment"] + list(AUGMENT_KEYS)
    return {k: getattr(args, k) for k in names if k != "preset" and hasattr(args, k)}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number; use 0..65535 (0 = any free port)")
    return port


def _check_dir_arg(flag: str, value: str | None) -> None:
    """A directory we will write into: a directory already, or creatable (no file in the way)."""
    if value is None:
        return
    p = Path(value)
    for place in (p, *p.parents):
        if place.exists():
            if not place.is_dir():
                raise ValueError(f"{flag} {value}: {place} is not a directory; pass a directory "
                                 f"(missing ones are created)")
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {value}: {place} is not writable; pass a directory you can write to")
            return


def _check_file_arg(flag: str, value: str | None) -> None:
    """A file we will write: not a directory, and its folder writable or creatable."""
    if value is None:
        return
    if Path(value).is_dir():
        raise ValueError(f"{flag} {value} is a directory; pass a file name, e.g. {Path(value) / 'model.onnx'}")
    _check_dir_arg(flag, str(Path(value).parent))


def _add_data_dir(p):
    p.add_argument("--data-dir", default=None,
                   help="directory holding the four Fashion-MNIST IDX files (.gz or raw); used or refused, "
                        "never replaced by another copy. Default: $FMNIST_DATA if set (same rule), else "
                        "/usr/share/datasets/fashion-mnist, ~/.cache/fmnist, else download")


# uvicorn's log levels (its config raises KeyError on any other) -> ours; trace is uvicorn's own, below debug.
SERVE_LOG_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
                    "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}


def _log_level(args) -> int:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        return logging.WARNING
    if args.command == "serve":  # one knob for the server's lines and uvicorn's
        return SERVE_LOG_LEVELS[args.log_level]
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fmnist", description="Train, evaluate, serve and export Fashion-MNIST CNNs.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    # ---- data
    p = sub.add_parser("data", help="find (or download) and verify the dataset; print counts per class",
                       description="Locate the Fashion-MNIST files, verify their SHA-256, print counts per class.")
    _add_data_dir(p)
    p.add_argument("--download", action="store_true",
                   help="download into the cache (~/.cache/fmnist) even if a copy exists elsewhere; files "
                        "already in the cache that do not verify are downloaded again (default: off)")

    # ---- photos
    p = sub.add_parser("photos", help="the real-photo sets: list, fetch (download or copy) and verify them",
                       description="Real labelled photos live outside the package: each set (real, train, outliers, "
                                   "nonclothing, everyday) is a manifest of sources pinned to a commit or a package "
                                   "version, licences and SHA-256s; its files are fetched into $FMNIST_PHOTOS or "
                                   "~/.cache/fmnist/photos and verified on every use. Files inside Debian packages "
                                   "come from $FMNIST_DEBIAN_MIRROR (default: the official Debian archive).")
    psub = p.add_subparsers(dest="photos_command", metavar="ACTION", required=True)
    q = psub.add_parser("list", help="the sets, their counts per class, kind, split and licence, and whether "
                                     "this machine has them")
    q.add_argument("sets", nargs="*", metavar="SET", help="sets to list (default: all)")
    q = psub.add_parser("fetch", help="download sets by their manifests (or copy them --from a local copy), "
                                      "verifying every file",
                        description="Bring photo sets onto this machine. Files already there and verified are "
                                    "kept (a second fetch downloads nothing); a file that cannot be had is "
                                    "named and the rest are kept. Exit status 1 if any file is missing.")
    q.add_argument("sets", nargs="*", metavar="SET", help="sets to fetch (default: all)")
    q.add_argument("--from", dest="local", metavar="DIR", default=None,
                   help="copy from a local copy (DIR/<set>/ or DIR itself) and verify it instead of downloading, "
                        "e.g. ../shared/photos (default: download from each row's source)")
    q.add_argument("--to", metavar="DIR", default=None,
                   help="where the sets go, DIR/<set>/ (default: $FMNIST_PHOTOS, else ~/.cache/fmnist/photos)")
    q.add_argument("--workers", type=int, default=8, help="downloads at once (default: 8)")
    q = psub.add_parser("verify", help="check that a folder holds every file of the sets, each matching its SHA-256",
                        description="Check the files of photo sets against their manifests: lists the missing "
                                    "and the damaged ones. Exit status 1 if any is.")
    q.add_argument("sets", nargs="*", metavar="SET", help="sets to check (default: all)")
    q.add_argument("--from", dest="local", metavar="DIR", default=None,
                   help="check DIR/<set>/ (default: where the set is found: $FMNIST_PHOTOS, else the cache)")

    # ---- train
    p = sub.add_parser("train", help="train a model (default preset: gpu on CUDA, else fast)",
                       description="Train a preset recipe. Flags left out take the preset's value. Results go to "
                                   "OUT_DIR/<timestamp>-<preset>/ (config, history.csv, best.pt, last.pt, report).",
                       )
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="recipe: seed = the lab assignment's Keras CNN unchanged; fast = best time-to-accuracy "
                        "on a CPU; photo = fast that has also seen what converted real photos look like (three "
                        "seeds of it averaged are the shipped model; ~7 min each); best-cpu = highest accuracy (15-35 min on 2 cores); gpu = large "
                        "batches for a GPU (94 %% in ~5 s of an H200); best-gpu = highest accuracy in ~10 min on one "
                        "H100 (its 180-epoch schedule is not yet measured; 60 epochs gave 95.4 %% in 130 s of "
                        "an H200) (default: gpu when training on CUDA, else fast)")
    p.add_argument("--model", dest="preset_deprecated", choices=list(PRESETS), help=argparse.SUPPRESS)
    _add_config_flags(p)
    _add_data_dir(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-epoch lines, only warnings and the final report (default: off)")

    # ---- evaluate
    p = sub.add_parser("evaluate", help="test-set report for a run directory or checkpoint",
                       description="Evaluate RUN_DIR/best.pt (or a checkpoint file) on the 10,000 test images; "
                                   "write report.md, metrics.json and pictures next to it (or into --out).")
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--out", default=None, help="directory for the report (default: the checkpoint's directory)")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation, and the one-pixel shifts where the model was trained "
                        "with --tta-shift (default: as the model was trained; --no-tta-flip drops both)")
    _add_data_dir(p)

    # ---- calibrate
    p = sub.add_parser("calibrate", help="fit temperature scaling and the 'unsure' threshold on validation",
                       description="Fit a softmax temperature (Guo et al. 2017) and the confidence below which "
                                   "the model is wrong more often than right, both on the checkpoint's own "
                                   "validation split; write them into the checkpoint (predict and serve use them) "
                                   "and report the expected calibration error on the test set before and after. "
                                   "`fmnist train` does this itself at the end of a run.")
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    _add_data_dir(p)

    # ---- ensemble
    p = sub.add_parser("ensemble", help="average runs of one recipe trained from different seeds into one model",
                       description="Average the predictions of several runs of one recipe (different --seed, one "
                                   "--split-seed) in one checkpoint: the mean of their log-probabilities. Seeds "
                                   "differ by points on real photos; their average is steadier and usually "
                                   "better than most of them, at one forward pass per member. Writes OUT/best.pt, "
                                   "its test report, and the temperature and unsure threshold refitted on the "
                                   "members' shared validation split; predict, serve, evaluate and export take it "
                                   "like any run.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR|CHECKPOINT", help="at least 2 runs of one recipe")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the ensemble (created)")
    _add_data_dir(p)

    # ---- predict
    p = sub.add_parser("predict", help="classify your own photos (files or folders)",
                       description="Classify photos: each is converted to what the model was trained on (a 28x28 "
                                   "light-on-black item) and classified. The default robust conversion finds the "
                                   "item first (background from the border, GrabCut, main component), so casual "
                                   "photos work; --pipeline paper is the dataset's own recipe (trim, subsample to "
                                   "28, sharpen, centre, negate), right for clean product shots only. A result is "
                                   "'unsure' when no clear item was found or the model's confidence is below the "
                                   "threshold chosen on validation. Exit status 0 only if every file succeeded.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint, run directory or .onnx file (default: the model shipped with fmnist)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="inference engine (default: torch; onnx needs `pip install 'fmnist[onnx]'`)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")
    p.add_argument("--pipeline", choices=["robust", "paper"], default="robust",
                   help="photo conversion: robust (find the item, for any photo) or paper (the dataset's "
                        "recipe, for clean product shots) (default: robust)")
    p.add_argument("--save-preprocessed", metavar="DIR", default=None,
                   help="write the 28x28 images the model saw as PNGs into DIR (default: off)")

    # ---- serve
    p = sub.add_parser("serve", help="HTTP API + web page (FastAPI/uvicorn)",
                       description="Serve the model: web page at /, POST /v1/predict, GET /v1/model, /healthz, "
                                   "OpenAPI docs at /docs. Concurrent requests are batched dynamically.")
    p.add_argument("--checkpoint", default=None, help="checkpoint, run directory or .onnx (default: shipped model)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="inference engine (default: torch)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0..65535 (default: 8000)")
    p.add_argument("--max-batch", type=_at_least(1, int), default=32,
                   help="dynamic batching: max images per forward pass; 1 disables batching (default: 32)")
    p.add_argument("--max-wait-ms", type=_at_least(0), default=2.0,
                   help="dynamic batching: max wait for a batch to fill, >= 0 (default: 2.0)")
    p.add_argument("--max-upload-mb", type=_at_least(1, int), default=10,
                   help="max request body in MiB, counted as it arrives (default: 10)")
    p.add_argument("--workers", type=_at_least(1, int), default=1,
                   help="server processes, each with its own model and event loop, sharing the port "
                        "(SO_REUSEPORT, Linux); more than one keeps more cores busy, at one model's memory "
                        "each (default: 1)")
    p.add_argument("--worker-restarts", type=_at_least(0, int), default=5, metavar="N",
                   help="with --workers: a worker that dies is replaced, at most N times a minute; past that the "
                        "server stops with an error (default: 5)")
    p.add_argument("--max-conversions", type=_at_least(1, int), default=None,
                   help="images converted at once across all requests, per worker process (default: the CPU "
                        "cores divided among the workers, at least 1)")
    p.add_argument("--conversion-wait", type=_at_least(0), default=2.0, metavar="SECONDS",
                   help="how long a request waits for a conversion slot before 503 + Retry-After (default: 2.0)")
    p.add_argument("--limit-concurrency", type=_at_least(1, int), default=256,
                   help="requests in progress (idle connections do not count), per worker process; past it "
                        "requests get 503 with Retry-After, except /healthz (default: 256)")
    p.add_argument("--keep-alive-timeout", type=_at_least(0, strict=True), default=5.0, metavar="SECONDS",
                   help="close an idle keep-alive connection after this (default: 5.0)")
    p.add_argument("--header-timeout", type=_at_least(0, strict=True), default=10.0, metavar="SECONDS",
                   help="time for a request head to arrive, from its first byte, else 408 (default: 10.0)")
    p.add_argument("--max-header-kb", type=_at_least(1, int), default=64, metavar="KIB",
                   help="max request head (request line + headers) in KiB, counted as it arrives, else 431 "
                        "(default: 64)")
    p.add_argument("--body-timeout", type=_at_least(0, strict=True), default=60.0, metavar="SECONDS",
                   help="time for a whole request body to arrive, else 408 (default: 60.0)")
    p.add_argument("--threads", type=_at_least(1, int), default=1,
                   help="inference threads (torch, ONNX Runtime); the rest of the cores convert images and run "
                        "the event loop (default: 1)")
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto",
                   help="HTTP/1.1 parser: httptools (C) or h11 (pure Python) (default: auto = httptools if installed)")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="event loop (default: auto = uvloop if installed)")
    p.add_argument("--log-level", type=str.lower, choices=list(SERVE_LOG_LEVELS), default="info", metavar="LEVEL",
                   help=f"log level of the server and uvicorn: {', '.join(SERVE_LOG_LEVELS)} (default: info)")
    p.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    p.add_argument("--pipeline", choices=["robust", "paper"], default="robust",
                   help="photo conversion: robust (find the item) or paper (the dataset's recipe) (default: robust)")
    p.add_argument("--index", metavar="DIR", default=None,
                   help="catalogue index (fmnist index build) that enables POST /v1/similar and the page's "
                        "'more like this'; built with the served model (default: off)")

    # ---- index, similar
    p = sub.add_parser("index", help="build or extend a catalogue index for visual search",
                       description="A catalogue index for `fmnist similar` and `fmnist serve --index`: each item's "
                                   "embedding (the model's penultimate features) in a vector-search engine, with a "
                                   "manifest, the items' sources and thumbnails. Needs pip install 'fmnist[search]'.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    for action, text in (("build", "embed every item of SOURCE into a new index in --out"),
                         ("add", "embed the items of SOURCE and add them to the existing --index")):
        q = isub.add_parser(action, help=text, description=text + ". SOURCE: a folder of product photos (labels "
                            "from its manifest.csv if it has one), a photo set by name (a folder under "
                            "$FMNIST_PHOTOS or ./photos), or fashion-mnist:train / fashion-mnist:test (the dataset "
                            "as a demo catalogue).")
        q.add_argument("source", metavar="SOURCE")
        if action == "build":
            q.add_argument("--out", required=True, metavar="DIR", help="directory for the new index (created)")
            q.add_argument("--engine", choices=["faiss", "usearch", "milvus"], default="faiss",
                           help="vector-search engine: faiss or usearch (a file in DIR), or milvus (a collection "
                                "in a Milvus database) (default: faiss; chosen by fmnist bench search)")
            q.add_argument("--milvus-uri", metavar="URI", default=None,
                           help="with --engine milvus: a Milvus server or cluster (http://host:19530; a token is "
                                "read from $FMNIST_MILVUS_TOKEN, never written down) or a Milvus Lite file "
                                "ending in .db (default: DIR/milvus.db, Milvus Lite)")
            q.add_argument("--collection", metavar="NAME", default=None,
                           help="with --engine milvus: the collection to create (default: fmnist_catalogue)")
        else:
            q.add_argument("--index", required=True, metavar="DIR", help="the index to add to")
        q.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: shipped model)")
        q.add_argument("--limit", type=_at_least(1, int), default=None,
                       help="take only the first N items of SOURCE (default: all)")
        _add_data_dir(q)
    p = sub.add_parser("similar", help="find the catalogue items that look most like your photos",
                       description="Convert each photo as `fmnist predict` does, embed it, and print its k nearest "
                                   "items in a catalogue index (id, class, distance = 1 - cosine similarity). A "
                                   "class the catalogue does not know is the model's, marked '?'.")
    p.add_argument("paths", nargs="+", metavar="PHOTO", help="image files or folders (searched recursively)")
    p.add_argument("--index", required=True, metavar="DIR", help="catalogue index (fmnist index build)")
    p.add_argument("-k", type=_at_least(1, int), default=8, help="neighbours per photo (default: 8)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint the index was built with (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")
    p.add_argument("--out", metavar="PNG", default=None,
                   help="also draw each photo, what the model saw and its neighbours into this picture (default: off)")

    # ---- export
    p = sub.add_parser("export", help="export a checkpoint to ONNX (optionally int8)",
                       description="Export to ONNX: dynamic batch axis, normalisation inside the graph, metadata "
                                   "(class names, model, accuracy) in the file. Needs pip install 'fmnist[onnx]'.")
    p.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantization calibrated on training images (default: off, fp32)")
    p.add_argument("--calibration-images", type=_at_least(1, int), default=1024,
                   help="training images used to calibrate int8 (default: 1024)")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint, .onnx / .int8.onnx)")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image with its mirror inside the graph (and their one-pixel shifts where "
                        "the model was trained with --tta-shift), as the model is evaluated in PyTorch "
                        "(default: as the model was trained; --no-tta-flip drops both and halves the compute, and "
                        "the file's accuracy and calibration are then measured for it on the dataset)")

    # ---- bench
    p = sub.add_parser("bench", help="measure throughput, hardware efficiency and time-to-accuracy",
                       description="Benchmark on this machine: fp32 matmul peak, training/inference images/s and "
                                   "GFLOP/s per model, eager vs torch.compile, and (part 'accuracy') wall time to "
                                   "92/93/94/95%% test accuracy per preset and seed, in seconds and in seed epochs: "
                                   "multiples of one training epoch of the `seed` network, timed at the start of the "
                                   "part, so that runs on different machines or days compare. Writes bench.json and a "
                                   "plot.")
    p.add_argument("parts", nargs="*", metavar="PART",
                   help="any of: throughput, accuracy, profile (where fast's training step spends its time), "
                        "photos (product-photo round trip), onnx (PyTorch vs ONNX "
                        "Runtime fp32/int8), serve (HTTP load test on loopback with wrk where installed, ~10 min: "
                        "adds an entry to OUT/serve.json), search (visual search: engines, quality, scale; "
                        "writes OUT/search.json as it goes) (default: throughput accuracy)")
    p.add_argument("--search-parts", default="engines,quality,scale",
                   help="search part: which of engines, quality, scale to run (default: engines,quality,scale)")
    p.add_argument("--search-engines", default="faiss,usearch,milvus",
                   help="search part, engines: which engines to measure; fewer than all replace their own entries in "
                        "search.json and keep the others (default: faiss,usearch,milvus)")
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="search part: catalogue sizes for scale, one entry each in search.json; the 1M one takes "
                        "minutes (default: 10000,100000,1000000)")
    p.add_argument("--copies", choices=("embedded", "moved"), default="embedded",
                   help="search part: catalogue items past the 60,000 training images are augmented copies of them, "
                        "embedded by the model (embedded: ~17 minutes of 2 cores for 1M, cached per copy), or the "
                        "training embeddings moved as far as an augmented copy moves one (moved: seconds; "
                        "default: embedded)")
    p.add_argument("--checkpoint", default=None,
                   help="model for the photos/onnx/serve parts (default: the shipped model)")
    p.add_argument("--real", metavar="SET", default=None,
                   help="photos part: also score a photo set of real labelled photos (a name such as real, or "
                        "a folder with a manifest.csv): paper vs robust conversion, per split (dev / heldout), kind and class, "
                        "confusion matrices (default: off)")
    p.add_argument("--nonclothing", metavar="SETS", default=None,
                   help="with --real: also count how many photos of no clothing (manifest label 'none'), "
                        "per split and kind, come back unsure; sets or folders comma-separated, e.g. "
                        "nonclothing,outliers (default: off)")
    p.add_argument("--ablation", action="store_true",
                   help="with --real: also run the robust conversion with each step dropped (default: off)")
    p.add_argument("--presets", default="seed,fast,best-cpu",
                   help="comma-separated presets for the accuracy part; NAME@N runs NAME with an N-epoch "
                        "schedule, NAME*K with only K seeds (default: seed,fast,best-cpu)")
    p.add_argument("--seeds", default="3",
                   help="seeds per preset: a count (3 = seeds 0,1,2) or a list (1,2); results are medians (default: 3)")
    p.add_argument("--append", action="store_true",
                   help="add to the bench.json already in --out (same machine): accuracy runs join the earlier "
                        "runs of the same preset (a seed run again replaces its old run), other parts measured "
                        "now replace theirs")
    p.add_argument("--epochs", default=None, help="override epochs per preset, e.g. 'best-cpu=20' (default: preset's)")
    p.add_argument("--out", default="runs/bench", help="output directory; the repository's own records are in "
                   "bench/cpu and bench/gpu (default: runs/bench)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = all cores)")
    p.add_argument("--device", default="auto",
                   help="device of the accuracy part and its seed-epoch reference (the throughput part runs on "
                        "CPU) (default: auto)")
    p.add_argument("--no-compile-check", action="store_true", help="skip the torch.compile comparison")
    p.add_argument("--dry-run", action="store_true",
                   help="run each part's whole code path at tiny sizes in seconds (1 epoch on 500 images, a few "
                        "steps, no torch.compile comparison): a smoke test whose figures mean nothing (default: off)")

    return ap


def need_extra(extra: str, what: str, *modules: str) -> None:
    """ImportError naming the pip extra that `what` needs, if any of `modules` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{what} needs the optional extra: pip install 'fmnist[{extra}]' "
                          f"({', '.join(missing)} not installed)")


SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "httptools", "swagger_ui_bundle")


def cmd_serve(args) -> int:
    need_extra("serve", "fmnist serve", *SERVE_MODULES)
    if args.index:
        need_extra("search", "fmnist serve --index", "faiss")
    if args.workers > 1:
        # The supervisor imports neither torch nor the app: each worker process does, and binds
        # its own socket (SO_REUSEPORT).
        from fmnist.serving.workers import supervise

        return supervise(args)
    # Bound before the app, torch and the model are imported (seconds): a port in use or a bad
    # --host is reported at once.
    from fmnist.serving.httpserver import listen_socket

    sock = listen_socket(args.host, args.port, reuse_port=False)
    from fmnist.serving.app import main as serve_main

    return serve_main(args, sock)


def cmd_index(args) -> int:
    need_extra("search", "fmnist index", "faiss")
    from fmnist.search.catalogue import add_to_index, build_index

    if args.index_command == "build":
        _check_dir_arg("--out", args.out)
        milvus = {"uri": args.milvus_uri, "collection": args.collection}
        if args.engine != "milvus" and any(milvus.values()):
            raise ValueError("--milvus-uri and --collection go with --engine milvus")
        idx = build_index(args.source, args.out, args.checkpoint, args.limit, engine=args.engine,
                          data_dir=args.data_dir, engine_options=milvus if args.engine == "milvus" else None)
    else:
        idx = add_to_index(args.source, args.index, args.checkpoint, args.limit, data_dir=args.data_dir)
    print(f"{idx.root}: {len(idx)} items ({idx.engine_name}, model {idx.model.get('description')}), "
          f"sources: {', '.join(idx.sources)}")
    return 0


def cmd_similar(args) -> int:
    import json

    need_extra("search", "fmnist similar", "faiss")
    from fmnist.search.embed import Embedder
    from fmnist.photos.preprocess import IMAGE_EXTENSIONS, iter_image_files
    from fmnist.search.catalogue import figure, format_results, query
    from fmnist.search.index import CatalogueIndex

    _check_file_arg("--out", args.out)
    files = iter_image_files(args.paths)
    if not files:
        raise ValueError(f"no image files found in {' '.join(args.paths)} "
                         f"(folders are searched for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    index = CatalogueIndex.open(args.index)   # before the model: a bad --index fails at once
    results = query(files, index, Embedder(args.checkpoint), args.k)
    print(json.dumps([r.to_dict() for r in results], indent=2) if args.json else format_results(results))
    if args.out:
        figure(results, index, args.out, photos=files)
        log.info(f"wrote {args.out}")
    failed = sum(not r.ok for r in results)
    if failed:
        print(f"{failed} of {len(results)} file(s) could not be searched", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args) -> int:
    from fmnist.inference.export import export

    _check_file_arg("--out", args.out)
    export(args.checkpoint, args.out, int8=args.int8, calib_n=args.calibration_images, tta_flip=args.tta_flip)
    return 0


def cmd_bench(args) -> int:
    from fmnist.bench.runner import run

    args.parts = args.parts or ["throughput", "accuracy"]
    bad = set(args.parts) - {"throughput", "accuracy", "profile", "photos", "onnx", "serve", "search"}
    if bad:
        raise ValueError(f"unknown bench part(s) {', '.join(sorted(bad))}; "
                         f"choose from throughput, accuracy, profile, photos, onnx, serve, search")
    if "search" in args.parts:
        need_extra("search", "fmnist bench search", "faiss", "usearch",
                   *(("pymilvus", "milvus_lite") if "milvus" in args.search_engines else ()))
    if "serve" in args.parts:
        need_extra("serve", "fmnist bench serve", *SERVE_MODULES, "httpx")
    if "onnx" in args.parts:
        need_extra("onnx", "fmnist bench onnx", "onnx", "onnxruntime")
    keep_freed_memory()  # as `fmnist train` does, so the bench measures what training gets
    return run(args)


def cmd_predict(args) -> int:
    import json
    from pathlib import Path

    from PIL import Image

    from fmnist.utils.atomic import atomic_path
    from fmnist.inference.predict import Predictor, format_table
    from fmnist.photos.preprocess import IMAGE_EXTENSIONS, iter_image_files

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    files = iter_image_files(args.paths)
    if not files:
        raise ValueError(f"no image files found in {' '.join(args.paths)} "
                         f"(folders are searched for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    if args.save_preprocessed:   # before the work, so a bad folder does not waste it
        out = Path(args.save_preprocessed)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--save-preprocessed {out}: cannot create the folder ({e.strerror or e})") from None
    predictor = Predictor(args.checkpoint, backend=args.backend, pipeline=args.pipeline)
    preds = predictor.predict(files, top_k=args.top_k)
    if args.save_preprocessed:
        for i, (f, p) in enumerate(zip(files, preds)):
            if p.ok:
                with atomic_path(out / f"{i:04d}-{f.stem}.png") as tmp:
                    Image.fromarray(p.image, "L").save(tmp, format="PNG")
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    else:
        print(format_table(preds, min(args.top_k, 10)))
    failed = sum(not p.ok for p in preds)
    if failed:
        print(f"{failed} of {len(preds)} file(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0


def cmd_calibrate(args) -> int:
    from fmnist.evaluation.calibrate import calibrate

    ds = None
    if args.data_dir:
        from fmnist import data
        ds = data.load(args.data_dir)
    r = calibrate(args.checkpoint, dataset=ds, device=args.device)
    print(f"temperature {r['temperature']:.3f}; unsure below {r['threshold']:.1%} top probability\n"
          f"validation NLL {r['val_nll_before']:.4f} -> {r['val_nll_after']:.4f}; "
          f"test ECE {r['test_ece_before']:.4f} -> {r['test_ece_after']:.4f}\n"
          f"test: {r['test_unsure_fraction']:.1%} unsure; accuracy {r['test_acc_when_sure']:.2%} when sure"
          + (f", {r['test_acc_when_unsure']:.2%} when unsure" if r['test_acc_when_unsure'] is not None else ""))
    return 0


def cmd_ensemble(args) -> int:
    from fmnist import data
    from fmnist.training.ensemble import make

    r = make(args.runs, args.out, dataset=data.load(args.data_dir) if args.data_dir else None)
    members = ", ".join(f"{m['val_acc']:.2%}" for m in r["members"] if m["val_acc"] is not None)
    print(f"ensemble of {len(r['members'])} runs -> {r['checkpoint']}\n"
          f"validation accuracy {r['val_acc']:.2%} (members: {members}); test accuracy {r['test_acc']:.2%}\n"
          f"temperature {r['calibration']['temperature']:.3f}, unsure below {r['calibration']['threshold']:.1%} "
          f"top probability; test ECE {r['calibration']['test_ece_before']:.4f} -> "
          f"{r['calibration']['test_ece_after']:.4f}")
    return 0


def cmd_photos(args) -> int:
    from fmnist.photos import sets

    chosen = args.sets or sets.names()
    for name in chosen:
        sets.manifest(name)  # an unknown name fails here, before any work
    if args.photos_command == "list":
        print(sets.describe(chosen))
        return 0
    if args.photos_command == "fetch":
        dest = Path(args.to).expanduser() if args.to else None
        local = Path(args.local).expanduser() if args.local else None
        failed = 0
        for name in chosen:
            r = sets.fetch(name, dest=dest, local=local, workers=args.workers)
            print(f"{name}: {r.had + r.got} of {r.had + r.got + len(r.failed)} photos in {r.folder} "
                  f"({r.got} {'copied' if local else 'downloaded'}, {r.had} already there)")
            for why in r.failed.values():
                print(f"  missing: {why}")
            failed += len(r.failed)
        return 1 if failed else 0
    bad = 0
    for name in chosen:
        folder = (Path(args.local).expanduser() / name) if args.local else sets.resolve(name).folder
        c = sets.check(sets.manifest(name), folder)
        print(f"{name}: {len(c.ok)} of {len(c.ok) + len(c.missing) + len(c.bad)} photos verified in {folder}")
        for f in c.missing:
            print(f"  missing: {f}")
        for f in c.bad:
            print(f"  does not match its SHA-256: {f}")
        bad += len(c.missing) + len(c.bad)
    if bad:
        print(f"{bad} photo(s) missing or damaged; {sets.fetch_hint()}", file=sys.stderr)
    return 1 if bad else 0


def cmd_data(args) -> int:
    from fmnist import data
    from fmnist.classes import CLASS_NAMES

    if args.download:
        root = data.fetch_all(data.cache_dir(), refetch_bad=True)
    else:
        root = data.locate(args.data_dir)
    arrays = data.load_arrays(root)  # verifies every SHA-256, raises on any mismatch
    print(f"Fashion-MNIST in {root}: all 4 files verified (SHA-256 of decompressed content)")
    import torch

    tr = data.class_counts(torch.from_numpy(arrays["train-labels"].astype("int64")))
    te = data.class_counts(torch.from_numpy(arrays["t10k-labels"].astype("int64")))
    print(f"\n{'label':>5}  {'class':<12} {'train':>6} {'test':>6}")
    for i, name in enumerate(CLASS_NAMES):
        print(f"{i:>5}  {name:<12} {tr[i]:>6} {te[i]:>6}")
    print(f"{'':>5}  {'total':<12} {sum(tr):>6} {sum(te):>6}")
    return 0


def _default_preset(device_flag: str | None) -> str:
    """The preset for the device training will run on, when --preset is not given."""
    from fmnist.training import config
    from fmnist.utils.runinfo import pick_device

    device = str(pick_device(device_flag or "auto"))
    preset = config.default_preset(device)
    if preset != "fast":
        log.info(f"no --preset given: {preset}, the default on {device} (--preset fast for the CPU recipe)")
    return preset


def cmd_train(args) -> int:
    from fmnist.training import config
    from fmnist.evaluation.evaluate import evaluate_run, summary_text
    from fmnist.training.train import train

    _check_dir_arg("--out-dir", args.out_dir)
    keep_freed_memory()
    if args.preset_deprecated:
        log.warning("--model is deprecated: it picks a preset, so it is now --preset (--arch picks the model)")
        if args.preset not in (None, args.preset_deprecated):
            raise ValueError(f"--model {args.preset_deprecated} and --preset {args.preset} disagree; give --preset")
    preset = args.preset or args.preset_deprecated or (None if args.resume else _default_preset(args.device))
    overrides = train_overrides(args)
    if args.resume:
        # Everything comes from the run being continued; only these may change.
        given = {k for k, v in overrides.items() if v is not None} | ({"preset"} if args.preset else set())
        extra = sorted(given - {"resume", "epochs", "device", "threads"})
        if extra or args.preset_deprecated:
            flags = sorted([_flag_name(k) for k in extra] + (["--model"] if args.preset_deprecated else []))
            raise ValueError(f"--resume continues a run with its own settings; drop {', '.join(flags)}")
        cfg = config.TrainConfig(resume=args.resume, epochs=args.epochs or 0, device=args.device or "auto",
                                 threads=args.threads or 0)
    else:
        cfg = config.resolve(preset, overrides)
    try:
        run_dir = train(cfg)
    except KeyboardInterrupt:
        return 130
    if run_dir is not None:  # rank 0 of a distributed run, or the only process
        print(summary_text(evaluate_run(run_dir, device=cfg.device)))
    return 0


def cmd_evaluate(args) -> int:
    from fmnist.evaluation.evaluate import evaluate_checkpoint, summary_text

    _check_dir_arg("--out", args.out)
    keep_freed_memory()
    ds = None
    if args.data_dir:
        from fmnist import data
        ds = data.load(args.data_dir)
    m = evaluate_checkpoint(args.checkpoint, device=args.device, dataset=ds, out_dir=args.out, tta_flip=args.tta_flip)
    print(summary_text(m))
    return 0


def _one_line_errors() -> tuple[type[Exception], ...]:
    """What a command reports as one line. Imported only when something is raised: the modules
    that define them import torch, which a command that fails before its work (`fmnist serve` on
    a port in use) need not wait for."""
    from fmnist.data import DataError
    from fmnist.models.checkpoint import CheckpointError
    from fmnist.photos.sets import PhotoSetError
    from fmnist.search.index import SearchIndexError

    return (DataError, CheckpointError, PhotoSetError, SearchIndexError, ValueError, ImportError)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return EXIT_USAGE
    setup_logging(_log_level(args))
    handlers = {"data": cmd_data, "photos": cmd_photos, "calibrate": cmd_calibrate, "ensemble": cmd_ensemble, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
                "bench": cmd_bench, "serve": cmd_serve, "index": cmd_index, "similar": cmd_similar,
                "export": cmd_export}
    try:
        rc = handlers[args.command](args)
        sys.stdout.flush()  # a reader that left shows up here, not as a traceback at exit
        return rc
    except BrokenPipeError:
        # `fmnist data | head -1`: the reader has what it wanted; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail
        return EXIT_SIGPIPE
    except OSError as e:  # a path we were given cannot be written or read: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"fmnist {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except _one_line_errors() as e:   # evaluated only when an exception gets this far
        print(f"fmnist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
