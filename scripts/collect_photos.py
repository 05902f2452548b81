#!/usr/bin/env python3
"""Rebuild (or check) photos/real/manifest.csv from the JPEGs in photos/real/.

Per-photo provenance (label, kind, source, licence, author, notes) lives in
photos/real/sources.csv; this script adds the SHA-256 of each committed JPEG
and the fixed split rule:  heldout if int(sha256[:8], 16) % 5 < 2 else dev.

    python scripts/collect_photos.py          # rewrite manifest.csv
    python scripts/collect_photos.py --check  # verify manifest.csv, exit 1 on mismatch
"""
import csv
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "photos" / "real"
FIELDS = ["file", "label", "kind", "split", "sha256", "source", "licence", "author", "notes"]
SLUGS = {"tshirt": "T-shirt/top", "trouser": "Trouser", "pullover": "Pullover", "dress": "Dress",
         "coat": "Coat", "sandal": "Sandal", "shirt": "Shirt", "sneaker": "Sneaker", "bag": "Bag",
         "ankleboot": "Ankle boot"}


def split_for(sha: str) -> str:
    return "heldout" if int(sha[:8], 16) % 5 < 2 else "dev"


def build_rows():
    src = {r["file"]: r for r in csv.DictReader(open(ROOT / "sources.csv", newline=""))}
    jpgs = sorted(p.name for p in ROOT.glob("*.jpg"))
    missing = sorted(set(src) - set(jpgs))
    extra = sorted(set(jpgs) - set(src))
    if missing or extra:
        sys.exit(f"sources.csv mismatch: missing files {missing}, undocumented files {extra}")
    rows = []
    for name in jpgs:
        r = src[name]
        slug, kind, _ = name.rsplit(".", 1)[0].split("-")
        assert SLUGS[slug] == r["label"], (name, r["label"])
        assert kind == r["kind"] and kind in ("clean", "casual"), name
        sha = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
        rows.append({**{k: r[k] for k in ("file", "label", "kind", "source", "licence", "author", "notes")},
                     "sha256": sha, "split": split_for(sha)})
    return rows


def main():
    rows = build_rows()
    out = ROOT / "manifest.csv"
    if "--check" in sys.argv:
        old = list(csv.DictReader(open(out, newline="")))
        if old != [{k: r[k] for k in FIELDS} for r in rows]:
            sys.exit("manifest.csv does not match the photos")
        print(f"manifest OK: {len(rows)} photos")
        return
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} ({len(rows)} photos)")


if __name__ == "__main__":
    main()
