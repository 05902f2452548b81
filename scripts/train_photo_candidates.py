#!/usr/bin/env python3
"""Extract candidate training photos from clothing-dataset and draw contact sheets to label by eye.

The `train` photo set is built in two steps: this script writes candidates (never used for
evaluation, not near-duplicates of any evaluation photo or of each other), then a person looks at
the contact sheets, writes the accepted ones into a decisions CSV, and `--accept` adds their rows
to the set's manifest (src/fmnist/photos/manifests/SET/manifest.csv: source URL pinned to the
commit, SHA-256 of source and stored file, recipe, licence) and puts the files into the set's
folder ($FMNIST_PHOTOS or the cache), as `fmnist photos fetch` would.

    python scripts/train_photo_candidates.py --repo CLOTHING_DATASET_GIT --labels T-Shirt,Pants \
        --per-label 150 --out /tmp/cand          # candidates + contact sheets
    python scripts/train_photo_candidates.py --accept /tmp/cand/decisions.csv --out /tmp/cand

The source is https://github.com/alexeygrigorev/clothing-dataset (CC0-1.0) at COMMIT, read from
a bare git clone with `git show`. Candidates are made by the set's RECIPE (EXIF orientation
applied, longest side <= 512, JPEG quality 85). It needs the photo sets on this machine (`fmnist
photos fetch`) for the near-duplicate checks.
"""
import argparse
import csv
import hashlib
import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fmnist.utils.atomic import write_bytes, write_text
from fmnist.photos import sets

COMMIT = "7ed86a9cc56763b6acb35e41cb35184e43a5d218"
URL = f"https://raw.githubusercontent.com/alexeygrigorev/clothing-dataset/{COMMIT}/images/"
RECIPE = "jpeg quality=85 max_side=512 resize=thumbnail"
SLUGS = {"T-shirt/top": "tshirt", "Trouser": "trouser", "Pullover": "pullover", "Dress": "dress",
         "Coat": "coat", "Sandal": "sandal", "Shirt": "shirt", "Sneaker": "sneaker", "Bag": "bag",
         "Ankle boot": "ankleboot"}
NEAR_EVAL = 10   # dHash distance to any evaluation photo below which a candidate is dropped
NEAR_SELF = 6    # ... and to any other training photo


def dhash(img: Image.Image) -> int:
    g = np.asarray(img.convert("L").resize((9, 8), Image.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def used_sources() -> set[str]:
    return {r.source.rsplit("/", 1)[-1].split(".")[0] for name in sets.names() for r in sets.manifest(name)}


def set_hashes(name: str) -> list[int]:
    ps = sets.resolve(name)
    return [dhash(Image.open(ps.path(r))) for r in ps.rows]


def extract(args):
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    labels = set(args.labels.split(","))
    rows = list(csv.DictReader(io.StringIO(subprocess.run(
        ["git", "--git-dir", args.repo, "show", f"{COMMIT}:images.csv"],
        capture_output=True, text=True, check=True).stdout)))
    used = used_sources()
    eval_h = set_hashes("real") + set_hashes("nonclothing")
    self_h = set_hashes("train")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    per_label = {k: int(v) for k, v in (x.split("=") for x in args.per_label.split(",") if "=" in x)}
    cap = (lambda lab: per_label.get(lab, 0)) if per_label else (lambda lab: int(args.per_label))
    taken: dict[str, int] = {}
    cands = []
    for r in rows:
        if r["label"] not in labels or r["image"] in used or taken.get(r["label"], 0) >= cap(r["label"]):
            continue
        if sets.heldout_contributor(f"clothing-dataset/{r['sender_id']}", 0):
            # A held-out contributor's photo would join the held-out split, and more photos could move
            # a contributor over the size limit and their held-out photos into training: training
            # candidates come only from contributors the rule never holds out.
            continue
        blob = subprocess.run(["git", "--git-dir", args.repo, "show", f"{COMMIT}:images/{r['image']}.jpg"],
                              capture_output=True, check=False).stdout
        try:
            stored = sets.make_stored(blob, RECIPE)
        except Exception:
            continue
        h = dhash(Image.open(io.BytesIO(stored)))
        if any(hamming(h, e) <= NEAR_EVAL for e in eval_h) or any(hamming(h, s) <= NEAR_SELF for s in self_h):
            continue
        self_h.append(h)
        taken[r["label"]] = taken.get(r["label"], 0) + 1
        name = f"c{len(cands):04d}.jpg"
        (out / "img" / name).write_bytes(stored)
        cands.append({"cand": name, "image": r["image"], "sender_id": r["sender_id"], "label": r["label"],
                      "source_sha256": hashlib.sha256(blob).hexdigest()})
    with open(out / "candidates.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["cand", "image", "sender_id", "label", "source_sha256"])
        w.writeheader()
        w.writerows(cands)
    for i in range(0, len(cands), 40):
        sheet = Image.new("RGB", (8 * 128, 5 * 140), "white")
        d = ImageDraw.Draw(sheet)
        for j, c in enumerate(cands[i:i + 40]):
            t = Image.open(out / "img" / c["cand"])
            t.thumbnail((124, 124))
            x, y = (j % 8) * 128, (j // 8) * 140
            sheet.paste(t, (x + 2, y + 2))
            d.text((x + 2, y + 127), f"{c['cand'][1:5]} {c['label'][:9]}", fill="red")
        sheet.save(out / f"sheet{i // 40:02d}.png")
    print(f"{len(cands)} candidates in {out}: {taken}")


def accept(args):
    out = Path(args.out)
    cands = {c["cand"]: c for c in csv.DictReader(open(out / "candidates.csv", newline=""))}
    manifest = sets.MANIFESTS / args.set / "manifest.csv"
    rows = [vars(r) for r in sets.read_rows(manifest)] if manifest.exists() else []
    folder = sets.cache_root() / args.set
    count: dict[str, int] = {}
    for r in rows:
        slug = r["file"].rsplit("-", 1)[0]
        count[slug] = count.get(slug, 0) + 1
    for d in csv.DictReader(open(args.accept, newline="")):
        c = cands[d["cand"]]
        slug = d.get("slug") or SLUGS[d["label"]]   # a "none" photo names what it shows instead
        count[slug] = count.get(slug, 0) + 1
        name = f"{slug}-{count[slug]:03d}.jpg"
        data = (out / "img" / c["cand"]).read_bytes()
        write_bytes(folder / name, data)
        rows.append({"file": name, "label": d["label"], "kind": d["kind"], "split": args.split,
                     "sha256": hashlib.sha256(data).hexdigest(), "source": URL + c["image"] + ".jpg",
                     "source_sha256": c["source_sha256"], "recipe": RECIPE, "licence": "CC0-1.0",
                     "author": f"clothing-dataset contributor (sender_id {c['sender_id']}); dataset by Alexey Grigorev",
                     "notes": f'clothing-dataset label "{c["label"]}"'})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=sets.COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(manifest, buf.getvalue())
    print(f"{manifest} now lists {len(rows)} photos; the files are in {folder}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", help="bare git clone of alexeygrigorev/clothing-dataset")
    ap.add_argument("--labels", default="T-Shirt,Pants,Longsleeve,Dress,Outwear,Shirt")
    ap.add_argument("--per-label", default="100",
                    help="candidates per clothing-dataset label, or LABEL=N,... per label (default: 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for candidates and contact sheets")
    ap.add_argument("--accept", help="decisions CSV (cand,label,kind[,slug]) to copy into --dest")
    ap.add_argument("--set", default="train", choices=sets.names(), help="photo set that accepted photos join")
    ap.add_argument("--split", default="train", choices=["train", "heldout"],
                    help="train: may be trained on; heldout: for evaluation only")
    args = ap.parse_args()
    if args.accept:
        accept(args)
    elif args.repo:
        extract(args)
    else:
        sys.exit("give --repo to extract candidates, or --accept to take decisions")


if __name__ == "__main__":
    main()
