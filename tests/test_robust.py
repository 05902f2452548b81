"""The robust photo conversion (robust.py) on made-up scenes and on committed real photos."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import photo_dir
from fmnist.photos import realphotos
from fmnist.photos import robust
from fmnist.photos.preprocess import load_rgb, preprocess



def scene(w=400, h=300, bg=(235, 235, 230)):
    img = Image.new("RGB", (w, h), bg)
    return img, ImageDraw.Draw(img)


def jpeg(img, q=92):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def test_badge_and_text_do_not_stretch_the_box():
    """A shop listing: the garment, a price badge in a corner and a text banner. The paper's trim
    takes everything unlike the corners; the robust box is the garment's."""
    img, d = scene()
    d.rectangle((150, 60, 250, 250), fill=(40, 60, 120))           # the item
    d.ellipse((10, 10, 60, 60), fill=(220, 30, 30))                 # price badge
    d.text((300, 270), "SALE -50%", fill=(0, 0, 0))                 # banner text
    r = preprocess(jpeg(img))
    assert r.pipeline == "robust" and r.item_found
    l, t, rr, b = r.box
    assert abs(l - 150) <= 6 and abs(t - 60) <= 6 and abs(rr - 251) <= 6 and abs(b - 251) <= 6
    paper = preprocess(jpeg(img), pipeline="paper")
    assert paper.box[0] < 20 and paper.box[1] < 20                   # the badge defines it there


def test_background_is_exactly_zero_and_item_is_light():
    img, d = scene(bg=(200, 190, 180))
    d.rectangle((120, 40, 280, 260), fill=(30, 30, 30))
    a = preprocess(jpeg(img)).image
    assert a.dtype == np.uint8 and a.shape == (28, 28)
    cols = np.flatnonzero(a.max(0) > 0)
    assert a[:, : cols[0]].max() == 0 and a[:, cols[-1] + 1:].max() == 0   # ground left and right
    assert a[14, 14] > 150                                                 # dark item -> light


def test_uneven_light_and_textured_ground():
    """Vignetted, noisy floor with a gradient: the paper's corner colour fails, GrabCut does not."""
    h, w = 300, 400
    yy, xx = np.mgrid[:h, :w]
    ground = 150 + 60 * (xx / w) - 40 * ((yy - h / 2) / h) ** 2
    rng = np.random.default_rng(0)
    a = np.clip(ground[..., None] + rng.normal(0, 6, (h, w, 3)), 0, 255)
    a[70:230, 150:260] = (20, 25, 30)
    r = preprocess(jpeg(Image.fromarray(a.astype(np.uint8))))
    assert r.item_found
    l, t, rr, b = r.box
    assert abs(l - 150) <= 8 and abs(rr - 260) <= 8 and abs(t - 70) <= 8 and abs(b - 230) <= 8


def test_white_item_on_white_keeps_its_silhouette():
    img, d = scene(bg=(246, 246, 246))
    d.rectangle((140, 50, 260, 250), fill=(255, 255, 255), outline=(200, 200, 200), width=3)
    r = preprocess(jpeg(img))
    assert (r.image > 0).sum() > 100            # not erased by the negation


def test_blank_photo_is_no_clear_item():
    img, _ = scene()
    r = preprocess(jpeg(img))
    assert not r.item_found and "no clear item" in r.note


def test_large_jpeg_decodes_reduced():
    """A 1-MP JPEG is decoded at a DCT-reduced scale and shrunk to the working size."""
    img, d = scene(1200, 900)
    d.rectangle((400, 200, 800, 700), fill=(50, 50, 50))
    rgb = load_rgb(jpeg(img), work=robust.WORK)
    assert max(rgb.size) == robust.WORK and rgb.info["orig_size"] == (1200, 900)
    assert preprocess(jpeg(img)).box[2] > 700     # box reported in the original's pixels


def test_each_ablation_switch_runs():
    img, d = scene()
    d.rectangle((150, 60, 250, 250), fill=(40, 60, 120))
    rgb = np.asarray(img)
    for kw in ({"grabcut": False}, {"main_component": False}, {"zero_background": False},
               {"polarity": False}, {"downscale": "thumb"}, {"downscale": "nearest"}):
        out = robust.convert(rgb, robust.RobustOptions(**kw))
        assert out.image.shape == (28, 28) and out.image.max() > 100


def test_border_distance_matches_the_broadcast_formula_on_a_real_photo():
    """The plane-by-plane distance is the broadcast (h, w, k, 3) formula it replaced, bit for
    bit (robust's outputs must not move), on a whole image and on a gathered (n, 3) pixel list."""
    rgb = np.asarray(load_rgb(photo_dir("real") / "pullover-clean-002.jpg", work=robust.WORK))
    lab8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    lab = lab8.astype(np.float32)
    centres = robust.border_model(lab)
    ref = np.sqrt(((lab[:, :, None, :] - centres[None, None]) ** 2).sum(-1)).min(-1)
    d = robust.border_distance(lab, centres)
    assert d.dtype == np.float32 and d.shape == rgb.shape[:2]
    assert np.array_equal(d, ref) and ref.max() > 50          # a real spread of distances
    pick = ref > np.median(ref)
    assert np.array_equal(robust.border_distance(lab8[pick], centres), ref[pick])


def test_real_photos_manifest_verifies_and_every_class_is_there():
    photo_dir("real")
    photos = realphotos.read_manifest("real")
    assert len(photos) >= 150
    assert {p.label for p in photos} == set(realphotos.CLASS_NAMES)
    assert {p.kind for p in photos} >= {"clean", "casual"} and {p.split for p in photos} == {"dev", "heldout"}


def test_real_photos_convert_to_an_item_on_black():
    """Real casual photos (a coat on a floor, shoes on tiles): an item is found, its ground is 0."""
    photo_dir("real")
    photos = [p for p in realphotos.read_manifest("real", verify=False) if p.kind == "casual"][::25]
    assert len(photos) >= 5
    for p in photos:
        r = preprocess(p.path)
        a = r.image
        assert r.item_found, p.path.name
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (border == 0).mean() > 0.5, p.path.name         # mostly ground around the item
        assert (a > 0).mean() > 0.1, p.path.name                # and an item of some size


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(realphotos.PhotoSetError, match="manifest.csv: missing"):
        realphotos.read_manifest(tmp_path)
    src = realphotos.read_manifest(photo_dir("real"), verify=False)[0]
    (tmp_path / "a.jpg").write_bytes(src.path.read_bytes() + b"x")
    (tmp_path / "manifest.csv").write_text(f"file,label,kind,split,sha256\na.jpg,Bag,clean,dev,{'0' * 64}\n")
    with pytest.raises(realphotos.PhotoSetError, match="does not match its SHA-256"):
        realphotos.read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text(f"file,label,kind,split,sha256\na.jpg,Hat,clean,dev,{'0' * 64}\n")
    with pytest.raises(realphotos.PhotoSetError, match="'Hat' is not a class"):
        realphotos.read_manifest(tmp_path)


def test_real_training_images_are_the_dev_split_only():
    """--real-photos trains on the dev split as predict converts it; held-out photos never enter."""
    from fmnist.training.train import real_training_images

    photo_dir("real")
    x, y = real_training_images("real")
    dev = realphotos.select(realphotos.read_manifest("real", verify=False), "dev")
    assert x.shape == (len(dev), 28, 28) and x.dtype.is_floating_point is False and len(y) == len(dev)
    assert y.tolist() == [realphotos.CLASS_NAMES.index(p.label) for p in dev]
    assert torch_equal_first(x, dev[0].path)


def test_real_training_images_under_three_conversions(tmp_path):
    """--real-conversions 3: the default conversion's block first (what predict sees), then the
    looser and the stricter seed threshold's, labels repeated (four dev photos, for time)."""
    from conftest import real_dev_folder
    from fmnist.photos.robust import RobustOptions
    from fmnist.training.train import REAL_SEED_K, real_training_images

    rows = real_dev_folder(tmp_path)
    x1, y1 = real_training_images(str(tmp_path))
    x3, y3 = real_training_images(str(tmp_path), conversions=3)
    assert x3.shape == (12, 28, 28) and y3.tolist() == y1.tolist() * 3 and REAL_SEED_K[0] == RobustOptions().seed_k
    assert np.array_equal(x3[:4].numpy(), x1.numpy())
    first = tmp_path / rows[0].split(",")[0]
    for block, k in ((1, 0.6), (2, 2.0)):
        assert np.array_equal(x3[4 * block].numpy(), preprocess(first, options=RobustOptions(seed_k=k)).image)
        assert not np.array_equal(x3[4 * block:4 * block + 4].numpy(), x1.numpy())   # not the default again


def torch_equal_first(x, path):
    return np.array_equal(x[0].numpy(), preprocess(path).image)
