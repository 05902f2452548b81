"""Does a Fashion-MNIST image's prediction depend on how its PNG was saved?

    PYTHONPATH=src python scripts/dataset_png_check.py --n 1000 --out bench/cpu/dataset_pngs.json

The first N test images, each saved as an L, RGB, RGBA (opaque) and palette (P) PNG (the grey
picture as Pillow, torchvision's save_image and matplotlib's imsave write it), are classified
three ways: `fmnist predict` (its own process), the Python API (Predictor) and POST /v1/predict
(a real server on 127.0.0.1). For each way and encoding: accuracy, how many images the model saw
unchanged (used as is, not converted as a photo), and how many got the L PNG's label; then how
many images got one label from all twelve. Adds one sitting (with the git commit) to --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import fmnist
from fmnist import data
from fmnist.utils.atomic import append_sitting
from fmnist.inference.predict import Predictor
from fmnist.utils.runinfo import environment

ENCODINGS = ("L", "RGB", "RGBA", "P")
PER_REQUEST = 16   # the server's default max_files
# The CLI and the server run the fmnist this script imported, wherever it was found.
ENV = {**os.environ, "PYTHONPATH": str(Path(fmnist.__file__).resolve().parents[1])}


def encode(a: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "L").convert(mode).save(buf, format="PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")), a), mode  # lossless
    return buf.getvalue()


def by_cli(dirs: dict[str, Path], tmp: Path, checkpoint: str | None) -> dict:
    """`fmnist predict` over the four folders in one process: labels and the images it saw."""
    seen = tmp / "cli-seen"
    cmd = [sys.executable, "-m", "fmnist", "predict", *map(str, dirs.values()), "--json",
           "--save-preprocessed", str(seen), *(["--checkpoint", checkpoint] if checkpoint else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, env=ENV)
    labels = [p["label"] for p in json.loads(r.stdout)]
    images = [np.asarray(Image.open(f)) for f in sorted(seen.iterdir())]
    n = len(labels) // len(dirs)
    return {enc: (labels[i * n:(i + 1) * n], images[i * n:(i + 1) * n]) for i, enc in enumerate(dirs)}


def by_api(dirs: dict[str, Path], checkpoint: str | None) -> dict:
    predictor = Predictor(checkpoint)
    out = {}
    for enc, d in dirs.items():
        preds = predictor.predict(sorted(d.iterdir()))
        out[enc] = ([p.top[0][0] for p in preds], [p.image for p in preds])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_server(dirs: dict[str, Path], checkpoint: str | None) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", "--port", str(port), "--log-level", "warning",
                             *(["--checkpoint", checkpoint] if checkpoint else [])], env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)
        out = {}
        with httpx.Client(timeout=120) as client:
            for enc, d in dirs.items():
                files = sorted(d.iterdir())
                labels, images = [], []
                for i in range(0, len(files), PER_REQUEST):
                    body = [("files", (f.name, f.read_bytes(), "image/png")) for f in files[i:i + PER_REQUEST]]
                    r = client.post(url + "/v1/predict", files=body, params={"include_image": True})
                    r.raise_for_status()
                    for p in r.json()["predictions"]:
                        labels.append(p["label"])
                        png = base64.b64decode(p["preprocessed"].split(",", 1)[1])
                        images.append(np.asarray(Image.open(io.BytesIO(png))))
                out[enc] = (labels, images)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="first N test images (default: 1000)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: the shipped model)")
    ap.add_argument("--out", required=True, help="JSON record to add this sitting to")
    args = ap.parse_args()
    ds = data.load()
    x, y = ds.test_images[:args.n].numpy(), ds.test_labels[:args.n].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {enc: tmp / enc for enc in ENCODINGS}
        for enc, d in dirs.items():
            d.mkdir()
            for i, a in enumerate(x):
                (d / f"{i:05d}.png").write_bytes(encode(a, enc))
        t0 = time.perf_counter()
        ways = {"cli": by_cli(dirs, tmp, args.checkpoint), "api": by_api(dirs, args.checkpoint),
                "server": by_server(dirs, args.checkpoint)}
        seconds = time.perf_counter() - t0
    names = Predictor(args.checkpoint).class_names
    truth = [names[int(t)] for t in y]
    results = {}
    for way, per_enc in ways.items():
        base = per_enc["L"][0]
        results[way] = {enc: {"accuracy": float(np.mean([a == t for a, t in zip(labels, truth)])),
                              "unchanged": float(np.mean([np.array_equal(s, a) for s, a in zip(images, x)])),
                              "same_label_as_L": float(np.mean([a == b for a, b in zip(labels, base)]))}
                        for enc, (labels, images) in per_enc.items()}
    all_labels = [labels for per_enc in ways.values() for labels, _ in per_enc.values()]
    one_label = float(np.mean([len(set(col)) == 1 for col in zip(*all_labels)]))
    sitting = {"environment": environment("cpu"), "n": args.n, "checkpoint": args.checkpoint or "shipped",
               "encodings": list(ENCODINGS), "results": results, "one_label_from_all_twelve": one_label,
               "seconds": seconds}
    k = append_sitting(args.out, sitting)
    for way, per_enc in results.items():
        for enc, r in per_enc.items():
            print(f"{way:<7} {enc:<5} accuracy {r['accuracy']:.1%}, unchanged {r['unchanged']:.1%}, "
                  f"label as L's {r['same_label_as_L']:.1%}")
    print(f"one label from all twelve: {one_label:.1%} of {args.n} images; sitting {k} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
