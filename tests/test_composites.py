"""Composites (--real-composites): an item moved onto another contributor's ground, converted as predict does."""

import numpy as np

from fmnist.photos import robust
from fmnist.training import composites


def photo(ground, item, size=(200, 160), box=(50, 40, 150, 120)):
    """A (h, w, 3) photo: a plain `ground` colour with an `item`-coloured rectangle (top, left, bottom, right)."""
    a = np.zeros((*size, 3), np.uint8)
    a[:] = ground
    t, l, b, r = box
    a[t:b, l:r] = item
    return a


def test_ground_strip_is_the_widest_side_and_none_when_the_item_fills_the_photo():
    a = photo((200, 30, 30), (20, 20, 200), box=(20, 10, 180, 60))   # item on the left: the right side is widest
    m = np.zeros(a.shape[:2], bool)
    m[20:180, 10:60] = True
    strip = composites.ground_strip(a, m)
    assert strip.shape == (200, 100, 3) and (strip == (200, 30, 30)).all()
    assert composites.ground_strip(a, np.ones_like(m)) is None
    full = composites.fill_frame(strip[:, :30], 200, 160)
    assert full.shape == (200, 160, 3) and (full == (200, 30, 30)).all()


def test_composites_put_each_item_on_another_contributors_ground():
    red_on_white = photo((235, 235, 235), (200, 20, 20), box=(30, 55, 110, 105))    # a small item: wide ground strips
    blue_on_green = photo((40, 160, 60), (30, 30, 220), box=(30, 55, 110, 105))
    x, src = composites.make([red_on_white, blue_on_green], ["a", "b"], 1, seed=0)
    assert x.shape == (2, 28, 28) and x.dtype == np.uint8 and list(src) == [0, 1]
    # the red item converted on the green ground is no longer what the white ground made of it
    alone = robust.convert(red_on_white).image
    assert (x[0] > 0).any() and not np.array_equal(x[0], alone)
    # one contributor only: no other ground, so no composite
    x, src = composites.make([red_on_white, blue_on_green], ["a", "a"], 2, seed=0)
    assert len(x) == 0 and len(src) == 0


def test_composites_are_the_same_for_the_same_seed():
    ps = [photo((235, 235, 235), (200, 20, 20), box=(30, 55, 110, 105)),
          photo((40, 160, 60), (30, 30, 220), box=(40, 50, 120, 110)),
          photo((120, 90, 60), (240, 240, 240), box=(20, 60, 100, 100))]
    a, sa = composites.make(ps, ["a", "b", "c"], 2, seed=3)
    b, sb = composites.make(ps, ["a", "b", "c"], 2, seed=3)
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and len(a) > 0


def test_composite_training_images_of_real_photos_and_their_share_of_an_epoch(tmp_path):
    """--real-composites 2 on four dev photos of `real`: labels follow the photo each composite was
    made from, and a clothing photo's 20 repeats are shared three ways; photos of no clothing keep 20."""
    import torch
    from conftest import real_dev_folder

    from fmnist.classes import CLASS_NAMES
    from fmnist.training.train import OUTLIER, real_composite_images, shared_with_composites

    rows = real_dev_folder(tmp_path)
    x, y = real_composite_images(str(tmp_path), 2, seed=0)
    assert x.dtype == torch.uint8 and x.shape[1:] == (28, 28) and 0 < len(x) <= 8
    assert set(y.tolist()) <= {CLASS_NAMES.index(line.split(",")[1]) for line in rows}
    labels = torch.tensor([3, 4, OUTLIER])
    photos, comps = shared_with_composites(labels, torch.full((3,), 20), 5, 20, 2)
    assert photos.tolist() == [7, 7, 20] and comps.tolist() == [7] * 5
