import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def idx_bytes(arr: np.ndarray, kind: str) -> bytes:
    """Encode uint8 images (N, 28, 28) or labels (N,) as an IDX file."""
    magic = 0x803 if kind == "images" else 0x801
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, kind: str, gz: bool = True) -> Path:
    data = idx_bytes(arr, kind)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(scope="session")
def dataset():
    """The real dataset (installed by `make test` via Debian's package, else downloaded once)."""
    from fmnist import data

    return data.load()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, dataset):
    """One short real training run, evaluated as `fmnist train` does, shared by the tests that
    need a trained model."""
    from fmnist import config
    from fmnist.evaluate import evaluate_run
    from fmnist.train import train

    out = tmp_path_factory.mktemp("runs")
    cfg = config.resolve("seed", {"epochs": 2, "subset": 4000, "out_dir": str(out), "batch_size": 64})
    run = train(cfg)
    evaluate_run(run, dataset=dataset)
    return run
