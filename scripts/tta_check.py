"""How much do one-pixel shifts add to the flip average at test time? Paired: the same saved
models, the same images, only the views averaged change. Choose on the validation columns; the
test columns are for reporting.

    PYTHONPATH=src python scripts/tta_check.py RUN/best.pt [RUN/best.pt ...] --out bench/cpu/best-cpu/tta_check.json
    python scripts/tta_check.py --table --out bench/cpu/best-cpu/tta_check.json    # every entry as a table

Views (logits summed): "flip" = the image and its mirror (what the package does by default);
"flip + 4 shifts" adds each of the two shifted by one pixel left, right, up and down (10 views,
5x the inference; what a recipe with `--tta-shift` does). Each model is judged on its own run's
validation split (the seed in its config); each split's row also records the seconds its 10
views took (fp32, batches of 1000, the torch threads of the process). Each call adds one entry
to OUT (see bench/README.md); `scripts/results_tables.py --tta OUT` renders the last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fmnist import data
from fmnist.models import checkpoint
from fmnist.utils.atomic import write_json
from fmnist.inference.forward import to_input
from fmnist.models.networks import SHIFTS, shifted
from fmnist.utils.runinfo import environment

from _records import parse_or_print_table


@torch.no_grad()
def view_logits(model, images: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    x = to_input(images, True)
    run = lambda t: torch.cat([model(t[i:i + batch]).float() for i in range(0, len(t), batch)])  # noqa: E731
    flip = run(x) + run(x.flip(3))
    shifts = sum(run(shifted(x, dx, dy)) + run(shifted(x, dx, dy).flip(3)) for dx, dy in SHIFTS)
    return {"flip": flip, "flip + 4 shifts": flip + shifts}


def check(path: str, ds) -> dict:
    model, ckpt = checkpoint.load_model(path)
    model = model.to(memory_format=torch.channels_last).eval()
    cfg = ckpt.get("train_config", {})
    _, val_idx = data.stratified_split(ds.train_labels, cfg.get("val_fraction", 0.1), data.split_seed(cfg))
    row = {"checkpoint": str(path), "preset": cfg.get("preset"), "seed": cfg.get("seed"), "epochs": cfg.get("epochs"),
           "model_config": cfg.get("model_config"), "lookahead": cfg.get("lookahead")}
    for split, (xs, ys) in {"val": (ds.train_images[val_idx], ds.train_labels[val_idx]),
                            "test": (ds.test_images, ds.test_labels)}.items():
        t0 = time.perf_counter()
        views = view_logits(model, xs)
        row[f"{split} seconds"] = time.perf_counter() - t0   # the 10 views of every image, fp32
        for name, logits in views.items():
            row[f"{split} {name}"] = (logits.argmax(1) == ys).float().mean().item()
    return row


def table(doc: dict) -> str:
    lines = ["| entry | model (its `fmnist bench` folder) | seed | val: flip | val: + 4 shifts | gain | test: flip "
             "| test: + 4 shifts | gain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, s in enumerate(doc["sittings"], 1):
        for r in s["rows"]:
            v0, v1, t0, t1 = (r[k] * 100 for k in ("val flip", "val flip + 4 shifts", "test flip", "test flip + 4 shifts"))
            record = Path(r["checkpoint"]).parents[2].name   # OUT of the `bench accuracy` run that trained it
            lines.append(f"| {n} | `{r['preset']}`, {r['epochs']} epochs ({record}) | {r['seed']} | {v0:.2f} % | {v1:.2f} % | "
                         f"{v1 - v0:+.2f} | {t0:.2f} % | {t1:.2f} % | {t1 - t0:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="saved models (best.pt of `fmnist train` runs)")
    args, out, doc = parse_or_print_table(ap, table)
    if not args.checkpoints:
        ap.error("give at least one checkpoint")
    ds = data.load(download=False)
    entry = {"environment": environment("cpu"), "rows": []}
    doc["sittings"].append(entry)
    for path in args.checkpoints:
        entry["rows"].append(check(path, ds))
        write_json(out, doc)
    print(table({"sittings": [entry]}))


if __name__ == "__main__":
    main()
