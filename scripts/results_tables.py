"""Render the Markdown tables of docs/RESULTS.md from `fmnist bench` output, so that every
figure there is copied by code from a bench.json, never typed by hand.

    python scripts/results_tables.py bench/cpu/bench.json [more bench.json ...] > /tmp/tables.md

Parts missing from a file are skipped; later files win where two hold the same part.
"""

import json
import math
import sys


def pct(x):
    return "-" if x is None else f"{x * 100:.2f} %"


def secs(x):
    return "not reached" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.0f} s"


def environment(env):
    return (f"{env['cpu']}, {env['cpu_count']} cores, {env['threads']} torch threads; torch {env['torch']}, "
            f"numpy {env['numpy']}, Python {env['python']}; fmnist commit `{(env.get('git_commit') or '?')[:12]}`; "
            f"measured {env['time']}")


def throughput(t):
    peaks, conv = t["matmul_peak_gflops"], t.get("conv_peak_gflops", {})
    out = ["Peaks: " + ", ".join(f"{k} matmul {v:.0f} GFLOP/s" for k, v in peaks.items())
           + ("; " + ", ".join(f"{k} dense 3x3 conv {v:.0f} GFLOP/s" for k, v in conv.items()) if conv else "")
           + f" (batch {t['batch']}).", "",
           "| model | params | MFLOP/img (train) | precision | train img/s | train GFLOP/s | of matmul peak "
           "| of conv peak | inference img/s |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in t["models"].items():
        for prec in ("fp32", "bf16"):
            if prec not in r:
                continue
            q = r[prec]
            out.append(f"| {name} | {r['params']:,} | {r['train_mflop_per_image']:.0f} | {prec} | {q['train_img_s']:,.0f} "
                       f"| {q['train_gflops']:.0f} | {q['train_peak_ratio']:.0%} | "
                       f"{q.get('train_conv_peak_ratio', float('nan')):.0%} | {q['infer_img_s']:,.0f} |")
    c = t.get("compile")
    if c:
        out += ["", "| `fast`, fp32, 200 training steps | steady img/s | seconds incl. compile |", "|---|---:|---:|"]
        for mode, r in c.items():
            out.append(f"| {mode} | " + (f"{r['steady_img_s']:,.0f} | {r['total_seconds_for_steps']:.1f} |"
                                         if "error" not in r else f"failed: {r['error']} | |"))
    return "\n".join(out)


def reference(ref):
    line = (f"Reference workload: {ref['workload']} ({ref['images']:,} images), on {ref['device']} "
            f"({ref['threads']} threads): {ref['seconds']:.2f} s")
    if ref.get("seconds_after") is not None:
        line += f" at the start of the sitting, {ref['seconds_after']:.2f} s at its end"
    return line + "."


def secs_fine(x):
    """Seconds with a decimal below 100 s (GPU runs take a few), for files with seed epochs."""
    return secs(x) if x is None or x >= 100 else f"{x:.1f} s"


def _times(secs_value, ratio, reached=None):
    """'143 s' (old bench.json), '4.6 s = 1.9x' with a seed-epoch ratio, then '(3/3)' if given."""
    cell = secs(secs_value) if ratio is None else f"{secs_fine(secs_value)} = {ratio:.1f}x"
    return cell + (f" ({reached})" if reached is not None else "")


def accuracy(a, ref=None):
    """Columns for 95 % and for seed epochs only where the bench.json holds them, so an older
    file renders exactly as it did."""
    keys = [k for k in ("0.92", "0.93", "0.94", "0.95") if any(f"time_to_{k}_median" in r["summary"] for r in a.values())]
    ratios = any("wall_seed_epochs_median" in r["summary"] for r in a.values())
    heads = " | ".join(f"to {float(k) * 100:.0f} %" for k in keys)
    out = []
    if ratios:
        out += [(reference(ref) + " " if ref else "") + "Times are seconds of training and validation, and "
                "the same as multiples of one seed epoch of the run's sitting (x).", ""]
    out += [f"| preset | seeds | final test acc (median) | mean ± std | wall s (median) | {heads} |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for spec, r in a.items():
        s = r["summary"]
        cells = [_times(s.get(f"time_to_{k}_median"), s.get(f"time_to_{k}_median_seed_epochs"),
                        s.get(f"time_to_{k}_reached", "-")) if f"time_to_{k}_reached" in s else "-" for k in keys]
        wall = (f"{secs_fine(s['wall_seconds_median'])[:-2]} = {s['wall_seed_epochs_median']:.1f}x"
                if "wall_seed_epochs_median" in s else f"{s['wall_seconds_median']:.0f}")
        out.append(f"| `{spec}` | {s['n']} | {pct(s['final_test_acc_median'])} | {s['final_test_acc_mean'] * 100:.2f} ± "
                   f"{s['final_test_acc_std'] * 100:.2f} | {wall} | " + " | ".join(cells) + " |")
    out += ["", "Per run:", "", f"| preset | seed | final test acc | wall s | {heads} |",
            "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for spec, r in a.items():
        for run in r["runs"]:
            t, se = run["time_to"], run.get("time_to_seed_epochs", {})
            wall = (f"{secs_fine(run['wall_seconds'])[:-2]} = {run['wall_seed_epochs']:.1f}x"
                    if "wall_seed_epochs" in run else f"{run['wall_seconds']:.0f}")
            out.append(f"| `{spec}` | {run['seed']} | {pct(run['final_test_acc'])} | {wall} | "
                       + " | ".join(_times(t[k], se.get(k)) if k in t else "-" for k in keys) + " |")
    return "\n".join(out)


def profile(p):
    out = [f"`{p['preset']}` (model `{p['model']}`, batch {p['batch']}, amp {p['amp']}, {p['threads']} threads): "
           f"{p['steps']} steps of the real training loop at {p['ms_per_step']:.0f} ms a step "
           f"({p['img_s_under_profiler']:,.0f} img/s under the profiler). Self time of every op, summed by "
           f"the outermost call it ran under.", "",
           "| phase / op kind | ms per step | share |", "|---|---:|---:|"]
    for k, r in p["phases"].items():
        out.append(f"| **{k}** | {r['ms_per_step']:.1f} | {r['share']:.0%} |")
    for k, r in p["kinds"].items():
        out.append(f"| {k} | {r['ms_per_step']:.1f} | {r['share']:.0%} |")
    return "\n".join(out)


def budget_sweep(rows):
    out = ["| variant (the `fast` recipe unless said) | epochs | validation accuracy | wall s |", "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['epochs']} | {pct(r['val_acc'])} | {r['wall_seconds']:.0f} |")
    return "\n".join(out)


def photos(p):
    return (f"{p['n']} test images (seed {p['seed']}), model `{p['model']}`: 28x28 accuracy {pct(p['acc_28x28'])}, "
            f"as product photos {pct(p['acc_photos'])} (gap {p['gap_points']:.2f} points; the same top-1 for "
            f"{p['agreement']:.1%}; {p['errors']} errors); {p['seconds_per_photo_predict'] * 1000:.1f} ms per photo "
            f"end to end (decode, preprocess, classify)."
            + (f" As shop listings (brand line, price badge, text banner around the photo): {pct(p['acc_listings'])}, "
               f"the same top-1 as the plain photo for {p['listing_agreement']:.1%}." if "acc_listings" in p else ""))


def onnx(o):
    tta = {True: "; flip TTA in every engine (two passes per image)", False: "; no TTA"}.get(o.get("tta_flip"), "")
    out = [f"Checkpoint `{o['checkpoint']}`; throughput at batch {o['batch']}, latency of one image{tta}.", "",
           "| engine | test acc | img/s (batch) | single image p50 | p99 |", "|---|---:|---:|---:|---:|"]
    for name, r in o["backends"].items():
        out.append(f"| {name} | {pct(r['test_acc'])} | {r['img_s_batch']:,.0f} | {r['latency_ms_p50']:.2f} ms | "
                   f"{r['latency_ms_p99']:.2f} ms |")
    return "\n".join(out)


def serve(s):
    out = [f"{s['payload']}; at most {s['max_requests']} requests or {s['max_seconds']:.0f} s per level.", "",
           "| setting | clients | requests/s | p50 | p99 | requests | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, rows in s["settings"].items():
        for r in rows:
            out.append(f"| {label} | {r['concurrency']} | {r['rps']:,.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
                       f"| {r['requests']} | {r['errors']} |")
    return "\n".join(out)


def _cell(r):
    return "-" if r is None or r.get("acc") is None else f"{r['acc'] * 100:.1f} % ({r['correct']}/{r['n']})"


def real_photos(old, mid, dev, t497, new):
    """bench.json dicts with photos_real: the previous model, the photo-trained one, the same
    with the dev photos in training, + the first 497 photos of photos/train (shipped before),
    and the shipped one (all 1,041 photos of photos/train, outlier hats)."""
    o, m, d, t, n = (x["photos_real"] for x in (old, mid, dev, t497, new))
    cols = [("paper conversion, previous model", o["variants"]["paper"]),
            ("robust, previous model", o["variants"]["robust"]),
            ("robust, photo-trained model", m["variants"]["robust"]),
            ("robust, + dev photos in training", d["variants"]["robust"]),
            ("robust, + 497 photos/train", t["variants"]["robust"]),
            ("robust, + 1,041 photos/train and hats (shipped)", n["variants"]["robust"])]
    out = [f"{n['n_photos']} photos in `{n['root']}` (manifest SHA-256 `{n['manifest_sha256'][:12]}`). Test accuracy on "
           f"the 10,000 28x28 test images: previous model {pct(o.get('test_acc_28x28'))}, photo-trained "
           f"{pct(m.get('test_acc_28x28'))}, + dev photos {pct(d.get('test_acc_28x28'))}, + 497 photos/train "
           f"{pct(t.get('test_acc_28x28'))}, shipped {pct(n.get('test_acc_28x28'))}.", ""]
    for split in ("heldout", "dev"):
        out += [f"**{split}** ({'never tuned on, never trained on' if split == 'heldout' else 'used to choose the conversion and augmentation; the shipped model was also trained on it, so its dev column is training accuracy'})", "",
                "| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
        out.append("| all | " + " | ".join(_cell(v[split]) for _, v in cols) + " |")
        for kind in ("clean", "casual"):
            out.append(f"| {kind} | " + " | ".join(_cell(v[split]["per_kind"].get(kind)) for _, v in cols) + " |")
        for cls in cols[0][1][split]["per_class"]:
            out.append(f"| {cls} | " + " | ".join(_cell(v[split]["per_class"].get(cls)) for _, v in cols) + " |")
        for label, r in (("Photo-trained model", m), ("+ dev photos", d), ("+ 497 photos/train", t), ("Shipped model", n)):
            u = r["variants"]["robust"][split]["unsure"]
            out += ["", f"{label}, {split}: {u['fraction']:.0%} of photos unsure; accuracy "
                        f"{pct(u['acc_when_sure'])} when sure, {pct(u['acc_when_unsure'])} when unsure."]
        out.append("")
    return "\n".join(out)


def ablation(mid):
    v = mid["photos_real"]["variants"]
    out = ["| conversion (photo-trained model) | dev | dev clean | dev casual | held-out | held-out clean | held-out casual |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in v.items():
        cells = []
        for split in ("dev", "heldout"):
            cells += [_cell(r[split]), _cell(r[split]["per_kind"].get("clean")), _cell(r[split]["per_kind"].get("casual"))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def confidence(new):
    c, out = new["photos_real"].get("calibration") or {}, []
    if c:
        out += [f"Temperature {c['temperature']:.3f} and threshold {c['threshold']:.1%} ({c['fitted_on']}). "
                f"Test set: expected calibration error (15 bins) {c['test_ece_before']:.4f} before, "
                f"{c['test_ece_after']:.4f} after; {c['test_unsure_fraction']:.1%} of test images unsure, accuracy "
                f"{pct(c['test_acc_when_sure'])} when sure and {pct(c['test_acc_when_unsure'])} when unsure.", ""]
    nc = new["photos_real"].get("nonclothing")
    if nc:
        out += ["| photos of no clothing (or no class of ours: hats) | n | unsure | why |", "|---|---:|---:|---|"]
        for split, r in nc.items():
            out.append(f"| {split} | {r['n']} | {r['unsure']} ({r['fraction']:.0%}) | "
                       + ", ".join(f"{k} {v}" for k, v in r["reasons"].items()) + " |")
            kinds = r.get("per_kind") or {}
            if len(kinds) > 1:   # e.g. things that are no clothing at all, and hats (no class of ours)
                for kind, k in kinds.items():
                    out.append(f"| {split}: {kind} | {k['n']} | {k['unsure']} ({k['fraction']:.0%}) | |")
    s = new.get("conversion_speed")
    if s:
        out += ["", f"Conversion of a {s['megapixels']:g}-megapixel JPEG on one core (decode included; {s['photos']} "
                    f"real photos scaled to 1 MP, {s['reps']} runs each): robust median {s['robust']['median_ms']:.1f} ms "
                    f"(p90 {s['robust']['p90_ms']:.1f} ms); paper median {s['paper']['median_ms']:.1f} ms "
                    f"(p90 {s['paper']['p90_ms']:.1f} ms)."]
    return "\n".join(out)


def seed_check(sc):
    """scripts/photo_seed_check.py: the same figures for two seeds of each recipe."""
    out = [f"Split `{sc['split']}`; {environment(sc['environment'])}.", "",
           "| model | test acc | real photos | clean | casual | things unsure | hats unsure |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in sc["models"].items():
        out.append(f"| {name} | {pct(m['test_acc'])} | {m['acc'] * 100:.1f} % | {m['clean'] * 100:.1f} % | "
                   f"{m['casual'] * 100:.1f} % | {m['nonclothing_unsure']}/{m['nonclothing_n']} | "
                   f"{m['heldout_hats_unsure']}/{m['heldout_hats_n']} |")
    return "\n".join(out)


def grabcut_check(record):
    """scripts/grabcut_dev_check.py's record: dev accuracy of each model under each setting."""
    out = []
    for sitting in record["sittings"]:
        settings = [(r["iterations"], r["seg_px"]) for r in sitting["models"][0]["settings"]]
        out += [f"Split `{sitting['split']}` ({sitting['photos']} photos); {environment(sitting['environment'])}.", "",
                "| model (not trained on these photos) | " + " | ".join(
                    f"{i} iteration{'s' * (i > 1)} at {px} px" for i, px in settings) + " |",
                "|---|" + "---:|" * len(settings)]
        for m in sitting["models"]:
            name = f"`{m.get('preset')}` seed {m.get('seed')}, commit `{(m.get('git_commit') or '?')[:7]}`"
            out.append(f"| {name} | " + " | ".join(
                f"{r['accuracy'] * 100:.1f} % ({r['right']}/{r['n']})" for r in m["settings"]) + " |")
        out.append("")
    return "\n".join(out)


def shipped_side_by_side(before, after, columns=("GrabCut 2 iterations (before)", "1 iteration (after)")):
    """Two sittings of `fmnist bench photos` for the shipped model, side by side: the same
    weights under two versions of the robust conversion, or two models under one."""
    b, a = before["photos_real"], after["photos_real"]
    out = [f"| shipped model, held-out | {columns[0]} | {columns[1]} |", "|---|---:|---:|"]
    rb, ra = b["variants"]["robust"]["heldout"], a["variants"]["robust"]["heldout"]
    out.append(f"| all | {_cell(rb)} | {_cell(ra)} |")
    for kind in ("clean", "casual"):
        out.append(f"| {kind} | {_cell(rb['per_kind'].get(kind))} | {_cell(ra['per_kind'].get(kind))} |")
    for cls in rb["per_class"]:
        out.append(f"| {cls} | {_cell(rb['per_class'].get(cls))} | {_cell(ra['per_class'].get(cls))} |")
    ub, ua = rb["unsure"], ra["unsure"]
    out.append(f"| unsure | {ub['fraction']:.0%} | {ua['fraction']:.0%} |")
    out.append(f"| accuracy when sure / unsure | {pct(ub['acc_when_sure'])} / {pct(ub['acc_when_unsure'])} "
               f"| {pct(ua['acc_when_sure'])} / {pct(ua['acc_when_unsure'])} |")
    nb, na = b["nonclothing"]["heldout"], a["nonclothing"]["heldout"]
    out.append(f"| photos of no clothing or hats, unsure | {nb['unsure']}/{nb['n']} | {na['unsure']}/{na['n']} |")
    pb, pa = before["photos"], after["photos"]
    out.append(f"| test images rendered as photos: gap to 28x28 | {pb['gap_points']:.2f} points | {pa['gap_points']:.2f} points |")
    out.append(f"| shop listings | {pct(pb['acc_listings'])} | {pct(pa['acc_listings'])} |")
    out += ["", f"Before: {environment(before['environment'])}. After: {environment(after['environment'])}."]
    return "\n".join(out)


def conversion_before_after(record):
    """scripts/conversion_before_after.py's record: one table per sitting, old and new interleaved."""
    out = []
    for s in record["sittings"]:
        out += [f"Against `{s['ref']}` (`{s['ref_commit'][:12]}`), {s['reps']} interleaved rounds, one core; "
                f"{environment(s['environment'])}.", "",
                "| input | path | before: median (p90) | after: median (p90) | speed-up |", "|---|---|---:|---:|---:|"]
        for r in s["rows"]:
            out.append(f"| {r['input']} | {r['path']} | {r['old_median_ms']:.2f} ms ({r['old_p90_ms']:.2f}) "
                       f"| {r['new_median_ms']:.2f} ms ({r['new_p90_ms']:.2f}) "
                       f"| {r['old_median_ms'] / r['new_median_ms']:.2f}x |")
        out.append("")
    return "\n".join(out)


def probe(pr):
    """scripts/gpu_sitting.py's probe: each preset's training loop, eager, per step."""
    out = ["| preset | network | batch | ms per step | images/s | training s per epoch | training s per schedule |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in pr.items():
        out.append(f"| `{name}` | {r['model']} | {r['batch']:,} | {r['ms_per_step']:.1f} | {r['img_s']:,.0f} "
                   f"| {r['projected_train_seconds_per_epoch']:.2f} | {r['projected_train_seconds']:.0f} "
                   f"({r['epochs']} epochs) |")
    return "\n".join(out)


def syncs(sy):
    """scripts/gpu_sitting.py's host-sync count for `gpu`'s loop."""
    if not sy or "skipped" in sy:
        return f"Not measured: {(sy or {}).get('skipped', 'the part failed')}."
    counts = ", ".join(f"{v} in an epoch of {k} steps" for k, v in sy["syncs_per_epoch_of_steps"].items())
    return f"Host syncs reported by CUDA's sync debug mode in `gpu`'s loop: {counts} ({sy['syncs_per_step']:g} per step)."


def final(f):
    """scripts/gpu_sitting.py's best-gpu: one plain `fmnist train` run, the test set once at its end."""
    out = ["| preset | seed | epochs | final test acc | best val acc | training s | training + validation s "
           "| whole call s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, r in f.items():
        out.append(f"| `{spec}` | {r['seed']} | {r['epochs']} | {pct(r['final_test_acc'])} | {pct(r['best_val_acc'])} "
                   f"| {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} = {r['wall_seed_epochs']:.1f}x "
                   f"| {r['call_seconds']:.0f} |")
    return "\n".join(out)


def epoch_times(a):
    """Per run: its first epoch (start-up, cuDNN's search, any compiling) against the mean of the
    others (the steady rate), from the wall-time curve of `fmnist bench accuracy`."""
    out = ["| preset | seed | epochs | first epoch s | later epochs, mean s |", "|---|---:|---:|---:|---:|"]
    for name, res in a.items():
        for r in res["runs"]:
            walls = [w for w, _ in r["curve"]]
            later = (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else float("nan")
            out.append(f"| `{name}` | {r['seed']} | {len(walls)} | {walls[0]:.2f} | {later:.3f} |")
    return "\n".join(out)


def main(paths):
    if paths and paths[0] == "--conversion":   # --conversion CONVERSION_BEFORE_AFTER
        print(conversion_before_after(json.load(open(paths[1]))))
        return
    if paths and paths[0] == "--grabcut":   # --grabcut GRABCUT_DEV_CHECK SHIPPED_BEFORE SHIPPED_AFTER
        record, before, after = [json.load(open(p)) for p in paths[1:4]]
        print(f"### GrabCut iterations, dev check\n\n{grabcut_check(record)}")
        print(f"### The shipped model under both\n\n{shipped_side_by_side(before, after)}\n")
        return
    if paths and paths[0] == "--seed-check":   # --seed-check SEED_CHECK (scripts/photo_seed_check.py)
        print(seed_check(json.load(open(paths[1]))))
        return
    if paths and paths[0] == "--shipped":   # --shipped BEFORE AFTER LABEL_BEFORE LABEL_AFTER
        before, after = [json.load(open(p)) for p in paths[1:3]]
        print(shipped_side_by_side(before, after, tuple(paths[3:5])))
        return
    if paths and paths[0] == "--photos":   # --photos PREVIOUS PHOTO-TRAINED DEV-PHOTOS TRAIN-497 SHIPPED [SEED-CHECK]
        old, mid, dev, t497, new = [json.load(open(p)) for p in paths[1:6]]
        print(f"### Environment\n\n{environment(new['environment'])}\n")
        print(f"### Real photos\n\n{real_photos(old, mid, dev, t497, new)}\n")
        print("### Ablation of the robust conversion (photo-trained model, not trained on the dev photos)"
              f"\n\n{ablation(mid)}\n")
        print(f"### Confidence (shipped model)\n\n{confidence(new)}\n")
        print(f"### Test images rendered as photos\n\nPrevious model: {photos(old['photos'])}\n\n"
              f"Photo-trained model: {photos(mid['photos'])}\n\n+ dev photos: {photos(dev['photos'])}\n\n"
              f"+ 497 photos/train: {photos(t497['photos'])}\n\nShipped model: {photos(new['photos'])}\n")
        if len(paths) > 6:   # scripts/photo_seed_check.py output
            print(f"### Seed spread\n\n{seed_check(json.load(open(paths[6])))}\n")
        return
    if paths and paths[0] == "--epoch-times":   # --epoch-times BENCH_OR_SITTING_JSON ...
        for p in paths[1:]:
            print(epoch_times(json.load(open(p))["accuracy"]) + "\n")
        return
    merged = {}
    for p in paths:
        with open(p) as f:
            merged.update(json.load(f))
    sections = [("Environment", environment, "environment"), ("Throughput", throughput, "throughput"),
                ("Profile of a training step", profile, "profile"),
                ("Budget sweep (scripts/budget_sweep.py)", budget_sweep, "rows"),
                ("Training step per preset (gpu_sitting.py probe)", probe, "probe"),
                ("Host syncs (gpu_sitting.py syncs)", syncs, "syncs"),
                ("Time to accuracy", lambda a: accuracy(a, merged.get("reference")), "accuracy"),
                ("Final accuracy of one `fmnist train` run (gpu_sitting.py best-gpu)", final, "final"),
                ("Photos", photos, "photos"),
                ("ONNX", onnx, "onnx"), ("Serving", serve, "serve")]
    for title, fn, key in sections:
        if key in merged:
            print(f"### {title}\n\n{fn(merged[key])}\n")
        if key == "environment":
            for a in merged.get("appended", []):  # bench --append: when and at which commit each addition ran
                what = ", ".join(a["parts"])
                if "accuracy" in a["parts"]:
                    what += f"; presets {a['presets']}, seeds {', '.join(map(str, a['seeds']))}"
                print(f"Added with `--append` ({what}): {environment(a['environment'])}"
                      + (f". {reference(a['reference'])}" if a.get("reference") else "") + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
