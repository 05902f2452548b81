"""Screenshot of the web page classifying a rendered product photo (docs/images/web-page.png).

    .venv/bin/python scripts/screenshot_page.py [--out docs/images/web-page.png]

Needs Debian's chromium (`make browser`) and Playwright (the dev extra).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_browser import ARGS  # noqa: E402
from test_serve import start_server  # noqa: E402

from fmnist import data
from fmnist.photos import render_product_photo  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "web-page.png"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"where to write the PNG (default: {OUT})")
    out = ap.parse_args().out
    from playwright.sync_api import sync_playwright

    ds = data.load()
    idx = int(np.flatnonzero(ds.test_labels.numpy() == 7)[3])  # a sneaker
    proc, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as d, sync_playwright() as p:
            photo = Path(d) / "sneaker.jpg"
            photo.write_bytes(render_product_photo(ds.test_images[idx].numpy(), np.random.default_rng(3)))
            b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=ARGS)
            page = b.new_page(viewport={"width": 900, "height": 760})
            page.goto(url)
            page.wait_for_selector("#strip button")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('label').textContent.includes('%')")
            page.screenshot(path=str(out), full_page=True)
            b.close()
    finally:
        proc.terminate()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
