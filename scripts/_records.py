"""What photo_cv.py and tta_check.py share: a JSON record at --out ({"sittings": [...]}, one entry
per call; see bench/README.md) that each call adds an entry to, or prints as a Markdown table
with --table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from fmnist.utils.atomic import read_record


def parse_or_print_table(ap: argparse.ArgumentParser, table: Callable[[dict], str]) -> tuple[argparse.Namespace, Path, dict]:
    """Adds --out and --table to `ap` and parses. With --table, prints table(record) and exits;
    otherwise -> (args, the record's path, the record so far: {"sittings": [...]})."""
    ap.add_argument("--out", required=True, help="JSON record to add this call's entry to")
    ap.add_argument("--table", action="store_true", help="print the record as a markdown table and exit")
    args = ap.parse_args()
    out = Path(args.out)
    doc = read_record(out)
    if args.table:
        print(table(doc))
        raise SystemExit(0)
    return args, out, doc
