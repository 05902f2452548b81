"""Photo splits are drawn by contributor: the shipped manifests follow the one rule, and no
contributor's photos are on both sides of the held-out line."""

from collections import defaultdict

from fmnist.photos import sets


def test_every_manifest_row_has_the_split_and_contributor_the_rule_gives():
    per = sets.contributor_counts(list(sets.OPEN_SPLIT))
    for name in sets.OPEN_SPLIT:
        for r in sets.manifest(name):
            assert r.contributor == sets.contributor_of(r), (name, r.file)
            assert r.split == sets.split_for(name, r, per), (name, r.file, r.contributor)


def test_no_contributor_is_both_held_out_and_seen():
    sides = defaultdict(set)
    for name in sets.OPEN_SPLIT:
        for r in sets.manifest(name):
            sides[r.contributor].add(r.split == "heldout")
    assert all(len(s) == 1 for s in sides.values())
    held = [c for c, s in sides.items() if True in s]
    assert len(held) > 20   # a rule that holds nobody out would pass the line above


def test_every_set_is_split_and_no_source_photo_is_on_both_sides():
    """Each set the rule covers, `everyday` included, has rows on both sides of the line, and the rows
    made from one source photo (crops of one wallpaper) all land on one side."""
    assert "everyday" in sets.OPEN_SPLIT
    sides = defaultdict(set)
    for name in sets.OPEN_SPLIT:
        rows = sets.manifest(name)
        assert {r.split for r in rows} == {"heldout", sets.OPEN_SPLIT[name]}, name
        for r in rows:
            sides[r.source].add(r.split == "heldout")
    assert all(len(s) == 1 for s in sides.values())
    crops = [r for r in sets.manifest("everyday") if "crop=" in r.recipe]
    assert any(r.split == "heldout" for r in crops) and any(r.split == "train" for r in crops)


def test_the_largest_contributors_stay_in_training_and_the_rule_is_fixed():
    per = sets.contributor_counts(list(sets.OPEN_SPLIT))
    big = [c for c, n in per.items() if n > sets.LARGE_CONTRIBUTOR]
    assert big and not any(sets.heldout_contributor(c, per[c]) for c in big)
    # the hash rule itself: a change to it would silently move photos between splits
    assert sets.heldout_contributor("clothing-dataset/322", 51)
    assert not sets.heldout_contributor("clothing-dataset/310", 48)
    row = sets.Row("x.jpg", "Bag", "clean", "dev", "0" * 64, author="clothing-dataset contributor (sender_id 7); x")
    assert sets.contributor_of(row) == "clothing-dataset/7"
    assert sets.contributor_of(sets.Row("y.jpg", "none", "nonclothing", "dev", "0" * 64,
                                        source="https://raw.githubusercontent.com/a/b/c/d.jpg")) == "a/b"


def test_training_reads_no_held_out_contributor(tmp_path):
    """The `train` set's rows of held-out contributors are heldout, and --real-photos skips them."""
    import shutil

    from conftest import photo_dir
    from fmnist.training.train import real_training_images

    src = photo_dir("train")
    rows = sets.manifest("train")
    pick = [next(r for r in rows if r.split == "train"), next(r for r in rows if r.split == "heldout")]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        f.write(",".join(sets.COLUMNS) + "\n")
        for r in pick:
            shutil.copy(src / r.file, tmp_path / r.file)
            f.write(",".join([r.file, r.label, r.kind, r.split, r.sha256] + [""] * (len(sets.COLUMNS) - 5)) + "\n")
    x, y = real_training_images(str(tmp_path))
    assert len(x) == 1
