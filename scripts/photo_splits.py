"""Apply the contributor split rule to the package's photo manifests (or check that they follow it).

    python scripts/photo_splits.py           # exit 1 and list the rows whose split or contributor differ
    python scripts/photo_splits.py --write   # fill the contributor column and rewrite the split column

The rule (fmnist.photos.sets.split_for): all photos of one contributor share a split; a contributor
is held out when sha256(contributor) mod 10 < 3, unless they hold more than 100 photos over all sets
(those stay in training). Rows not held out get their set's open split (dev for `real` and
`nonclothing`, train for `train`, `outliers` and `everyday`).
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter

from fmnist.photos import sets
from fmnist.utils.atomic import write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the manifests (default: only check them)")
    args = ap.parse_args()
    chosen = [n for n in sets.names() if n in sets.OPEN_SPLIT]
    per = Counter(sets.contributor_of(r) for n in chosen for r in sets.manifest(n))
    changed = 0
    for name in chosen:
        path = sets.MANIFESTS / name / "manifest.csv"
        with path.open(newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
        rows = sets.read_rows(path)
        for d, r in zip(raw, rows):
            want_c = sets.contributor_of(r)
            want_s = "heldout" if sets.heldout_contributor(want_c, per[want_c]) else sets.OPEN_SPLIT[name]
            if d.get("contributor") != want_c or d["split"] != want_s:
                changed += 1
                if not args.write:
                    print(f"{name}/{r.file}: split {d['split']} -> {want_s}, contributor {want_c!r}")
            d["contributor"], d["split"] = want_c, want_s
        split_counts = Counter(d["split"] for d in raw)
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(split_counts.items())))
        if args.write:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=sets.COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows({k: d.get(k, "") for k in sets.COLUMNS} for d in raw)
            write_text(path, buf.getvalue())
    if changed and not args.write:
        raise SystemExit(f"{changed} rows differ from the rule; run with --write")


if __name__ == "__main__":
    main()
