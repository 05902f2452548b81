import gzip
import logging
import os
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 3 workers on 2 cores) each worker, and every process it
    starts, gets one torch/OpenMP thread: workers of 2 threads each would oversubscribe the cores,
    and OpenMP threads spin while they wait."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


# The test files that cost the most CPU-seconds (measured on the 2-core machine), in the order
# `make test` hands them to its workers (--dist loadfile --no-loadscope-reorder: collection
# order). Heaviest first, so that the cores stay busy to the end: xdist's own order (most tests
# first) left the few-test, long files (the notebook, gpu_bench, DDP) to one worker at the end.
# test_resume_ddp and test_checkpoint build the shared runs the others need (fast_run, tiny_train),
# each on its own worker at once, so that no worker starts by waiting for another's.
HEAVY_FIRST = ("test_resume_ddp.py", "test_checkpoint.py", "test_bench.py", "test_ensemble.py", "test_export.py",
               "test_train.py", "test_serve_workers.py", "test_tta_shift.py", "test_predict.py", "test_cli.py",
               "test_notebook.py", "test_serve_hostile.py", "test_serve.py", "test_gpu_presets.py",
               "test_gpu_bench.py", "test_bench_reference.py", "test_search.py", "test_search_milvus.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's own order stays


def needs(*modules: str):
    """A mark that skips a test module whose optional packages are missing, found without
    importing them: pytest.importorskip at module level would import pymilvus (0.35 s) in every
    xdist worker at collection, whether or not that worker runs the module."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (make test installs them)")


def photo_dir(name: str) -> Path:
    """The folder of photo set `name`, or skip: photos are data kept outside the tree, found in
    $FMNIST_PHOTOS (`make test` points it at ../shared/photos) or the cache."""
    from fmnist.photos import sets

    try:
        return sets.resolve(name).folder
    except sets.PhotoSetError:
        pytest.skip(f"photo set {name!r} is not on this machine: run `fmnist photos fetch {name}` "
                    f"(or `fmnist photos fetch --from DIR` with a local copy, or set FMNIST_PHOTOS)")


def real_dev_folder(folder: Path, n: int = 4) -> list[str]:
    """The first `n` dev rows of the `real` set copied into `folder` with their own manifest.csv (a
    small photo set for tests that convert, for time); -> those manifest lines. Skips without `real`."""
    from fmnist.photos import sets

    real = photo_dir("real")
    lines = (sets.MANIFESTS / "real" / "manifest.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if ",dev," in line][:n]
    (folder / "manifest.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    for line in rows:
        shutil.copy(real / line.split(",")[0], folder)
    return rows


def idx_bytes(arr: np.ndarray, kind: str) -> bytes:
    """Encode uint8 images (N, 28, 28) or labels (N,) as an IDX file."""
    magic = 0x803 if kind == "images" else 0x801
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


def grey_pngs(a: np.ndarray) -> dict[str, bytes]:
    """A (28, 28) uint8 image as the PNGs different tools write of one grey picture: mode L, RGB
    (torchvision's save_image), RGBA with opaque alpha (matplotlib's imsave) and palette (P)."""
    import io

    from PIL import Image

    grey = Image.fromarray(a, "L")
    images = {"L": grey, "RGB": grey.convert("RGB"), "RGBA": grey.convert("RGBA"), "P": grey.convert("P")}
    out = {}
    for mode, img in images.items():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out[mode] = buf.getvalue()
        assert Image.open(io.BytesIO(out[mode])).mode == mode
    return out


def write_idx(path: Path, arr: np.ndarray, kind: str, gz: bool = True) -> Path:
    data = idx_bytes(arr, kind)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(scope="session")
def dataset():
    """The real dataset (installed by `make test` via Debian's package, else downloaded once)."""
    from fmnist import data

    return data.load()


def shared_dir(tmp_path_factory, name: str, make) -> Path:
    """A directory that `make(dir)` fills once per test session, even under pytest-xdist: the
    first worker to ask builds it while the others wait on a file lock, so a shared training
    run is not trained once per worker (the xdist docs' recipe)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    d = root / name
    with FileLock(str(d) + ".lock"):
        if not (d / ".complete").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            make(d)
            (d / ".complete").touch()
    return d


def run_cli(*argv) -> SimpleNamespace:
    """`fmnist ARGV` in this process, without a new interpreter's ~4.5 CPU-seconds of imports ->
    (returncode, stdout, stderr) as subprocess.run would give; an uncaught exception fails the
    test. torch's thread count is restored after it (--threads sets it)."""
    import contextlib
    import io

    import torch

    from fmnist.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's usage errors
                rc = e.code
    finally:
        torch.set_num_threads(threads)
        logger = logging.getLogger("fmnist")
        for h in [h for h in logger.handlers if getattr(h, "fmnist_cli", False)]:
            logger.removeHandler(h)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def run_script(monkeypatch, script: Path, *argv) -> SimpleNamespace:
    """`python scripts/SCRIPT ARGV` in this process (torch and the package are imported already)
    -> (returncode, stdout, stderr), a SystemExit's message on stderr as the interpreter prints it."""
    import contextlib
    import io
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    monkeypatch.syspath_prepend(str(Path(script).parent))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):
        err.write(code)
        code = 1
    return SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory, dataset):
    """One short real training run by `fmnist train` (1 thread, so other load cannot stall it),
    shared by the tests that need a trained model or the command's output: .run (the run
    directory), .stdout, .stderr. Its validation split is 1,200 images (--val-fraction 0.02):
    enough to pick the best epoch and fit a calibration, and every test that evaluates or
    calibrates the run goes through it."""
    def make(d: Path):
        r = run_cli("train", "--preset", "seed", "--epochs", "2", "--subset", "2000", "--test-subset", "2000",
                    "--val-fraction", "0.02", "--threads", "1", "--out-dir", d / "runs")
        assert r.returncode == 0, r.stderr
        (d / "stdout").write_text(r.stdout)
        (d / "stderr").write_text(r.stderr)

    d = shared_dir(tmp_path_factory, "tiny-train", make)
    (run,) = (d / "runs").iterdir()
    return SimpleNamespace(run=run, stdout=(d / "stdout").read_text(), stderr=(d / "stderr").read_text())


@pytest.fixture(scope="session")
def tiny_run(tiny_train):
    """The run directory of that run."""
    return tiny_train.run


# A tiny `fast`-style run that holds every piece of state a resume must restore and every
# training path a short run can take: the augmentation stream (shifts, flips, erasing, photo
# artefacts, shoe pairs), the one-cycle schedule, the weight EMA, BatchNorm statistics, and the
# calibration at the end. 1,000 images (1,200 for validation, 1,000 for test), 2 epochs, 1 thread
# so every run uses the same kernels.
FAST_RUN_ARGS = ["--preset", "fast", "--ema", "0.9", "--erase", "0.25", "--photo", "0.2", "--pairs", "0.5",
                 "--subset", "1000", "--test-subset", "1000", "--val-fraction", "0.02", "--batch-size", "64",
                 "--epochs", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory, dataset):
    """That run, by `fmnist train` in the test process (run_cli), shared by the tests that need it:
    .run (the run directory), .args (the train flags), .steps (optimizer steps in all). The runs
    compared with it bit for bit start in processes of their own (test_resume_ddp)."""
    def make(d: Path):
        r = run_cli("train", *FAST_RUN_ARGS, "--out-dir", d)
        assert r.returncode == 0, r.stderr

    (run,) = [p for p in shared_dir(tmp_path_factory, "fast-run", make).iterdir() if p.is_dir()]
    return SimpleNamespace(run=run, args=FAST_RUN_ARGS, steps=2 * (1000 // 64 + 1))


@pytest.fixture
def cli():
    """run_cli, as a fixture."""
    return run_cli


@pytest.fixture(autouse=True)
def _drop_cli_log_handler():
    """cli.main() installs a handler on the `fmnist` logger; a test that ran it leaves none behind."""
    yield
    logger = logging.getLogger("fmnist")
    for h in [h for h in logger.handlers if getattr(h, "fmnist_cli", False)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


# The tests' catalogue: the first 300 test images, indexed with the shipped model (a few seconds).
CATALOGUE_ITEMS = 300


@pytest.fixture(scope="session")
def catalogue_index(tmp_path_factory, dataset) -> Path:
    """A small catalogue index built once per session (shared by xdist workers): the tests that
    modify an index work on a copy (shutil.copytree)."""
    def make(d: Path):
        from fmnist.search.catalogue import build_index

        build_index("fashion-mnist:test", d / "index", limit=CATALOGUE_ITEMS)

    return shared_dir(tmp_path_factory, "catalogue-index", make) / "index"
