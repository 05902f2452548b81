#!/usr/bin/env python3
"""Extract candidate training photos from clothing-dataset and draw contact sheets to label by eye.

photos/train/ is built in two steps: this script writes candidates (never used for evaluation,
not near-duplicates of any evaluation photo or of each other), then a person looks at the
contact sheets, writes the accepted ones into a decisions CSV, and `--accept` copies those into
photos/train/ with their manifest rows.

    python scripts/train_photo_candidates.py --repo CLOTHING_DATASET_GIT --labels T-Shirt,Pants \
        --per-label 150 --out /tmp/cand          # candidates + contact sheets
    python scripts/train_photo_candidates.py --accept /tmp/cand/decisions.csv --out /tmp/cand

The source is https://github.com/alexeygrigorev/clothing-dataset (CC0-1.0) at COMMIT, read from
a bare git clone with `git show`. Candidates are re-encoded as photos/train/README.md describes
(EXIF orientation applied, longest side <= 512, JPEG quality 85).
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
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "7ed86a9cc56763b6acb35e41cb35184e43a5d218"
URL = f"https://github.com/alexeygrigorev/clothing-dataset/blob/{COMMIT}/images/"
FIELDS = ["file", "label", "kind", "split", "sha256", "source", "licence", "author", "notes"]
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
    ids = set()
    for m in ("photos/real/manifest.csv", "photos/nonclothing/manifest.csv", "photos/train/manifest.csv",
              "photos/outliers/manifest.csv"):
        for r in csv.DictReader(open(ROOT / m, newline="")):
            ids.add(r["source"].rsplit("/", 1)[-1].split(".")[0])
    return ids


def folder_hashes(folder: str) -> list[int]:
    return [dhash(Image.open(p)) for p in sorted((ROOT / folder).glob("*.jpg"))]


def extract(args):
    out = Path(args.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    labels = set(args.labels.split(","))
    rows = list(csv.DictReader(io.StringIO(subprocess.run(
        ["git", "--git-dir", args.repo, "show", f"{COMMIT}:images.csv"],
        capture_output=True, text=True, check=True).stdout)))
    used = used_sources()
    eval_h = folder_hashes("photos/real") + folder_hashes("photos/nonclothing")
    self_h = folder_hashes("photos/train")
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    taken: dict[str, int] = {}
    cands = []
    for r in rows:
        if r["label"] not in labels or r["image"] in used or taken.get(r["label"], 0) >= args.per_label:
            continue
        blob = subprocess.run(["git", "--git-dir", args.repo, "show", f"{COMMIT}:images/{r['image']}.jpg"],
                              capture_output=True, check=False).stdout
        try:
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
        except Exception:
            continue
        img.thumbnail((512, 512), Image.LANCZOS)
        h = dhash(img)
        if any(hamming(h, e) <= NEAR_EVAL for e in eval_h) or any(hamming(h, s) <= NEAR_SELF for s in self_h):
            continue
        self_h.append(h)
        taken[r["label"]] = taken.get(r["label"], 0) + 1
        name = f"c{len(cands):04d}.jpg"
        img.save(out / "img" / name, quality=85)
        cands.append({"cand": name, "image": r["image"], "sender_id": r["sender_id"], "label": r["label"]})
    with open(out / "candidates.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["cand", "image", "sender_id", "label"])
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
    dest = ROOT / args.dest
    dest.mkdir(parents=True, exist_ok=True)
    manifest = dest / "manifest.csv"
    rows = list(csv.DictReader(open(manifest, newline=""))) if manifest.exists() else []
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
        tmp = dest / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(dest / name)
        rows.append({"file": name, "label": d["label"], "kind": d["kind"], "split": args.split,
                     "sha256": hashlib.sha256(data).hexdigest(), "source": URL + c["image"] + ".jpg",
                     "licence": "CC0-1.0",
                     "author": f"clothing-dataset contributor (sender_id {c['sender_id']}); dataset by Alexey Grigorev",
                     "notes": f'clothing-dataset label "{c["label"]}"'})
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.rename(manifest)
    print(f"{args.dest} now has {len(rows)} photos")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", help="bare git clone of alexeygrigorev/clothing-dataset")
    ap.add_argument("--labels", default="T-Shirt,Pants,Longsleeve,Dress,Outwear,Shirt")
    ap.add_argument("--per-label", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for candidates and contact sheets")
    ap.add_argument("--accept", help="decisions CSV (cand,label,kind[,slug]) to copy into --dest")
    ap.add_argument("--dest", default="photos/train", help="folder (in the repo) that accepted photos join")
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
