"""Copy a trained run's best.pt (or an `fmnist ensemble` directory's) into the package as the
default model, with its test metrics and provenance, and write assets/MODEL_CARD.md beside it.

    python scripts/ship_model.py runs/<run>  [--command "fmnist train ..."]

The run directory needs what `fmnist train` (or `fmnist ensemble`, then `fmnist evaluate`)
leaves there: best.pt, metrics.json, environment.json and train_summary.json.
"""

import argparse
import json
from pathlib import Path

from fmnist.models import checkpoint
from fmnist.utils.atomic import write_text
from fmnist.models.networks import ENSEMBLE

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fmnist" / "assets"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--command", default="fmnist train", help="the command that trained it (default: fmnist train)")
    ap.add_argument("--assets", type=Path, default=ASSETS,
                    help="folder to write default.pt and MODEL_CARD.md into (default: the package's assets)")
    args = ap.parse_args()
    assets = args.assets
    ckpt = checkpoint.load(args.run_dir / "best.pt")
    m = json.loads((args.run_dir / "metrics.json").read_text())
    env = json.loads((args.run_dir / "environment.json").read_text())
    summary = json.loads((args.run_dir / "train_summary.json").read_text())
    ckpt["metrics"] = {**ckpt["metrics"], "test_acc": m["test_acc"], "test_loss": m["test_loss"]}
    ckpt["provenance"] = {"command": args.command, "run": args.run_dir.name, "environment": env,
                          "train_seconds": summary["train_seconds"]}
    checkpoint.save(ckpt, assets / "default.pt")
    # Temperature and unsure threshold: fitted on the run's validation split (as `fmnist train`
    # did), now also reporting the test ECE before and after for the card.
    from fmnist.evaluation.calibrate import calibrate

    cal = calibrate(assets / "default.pt")
    rep = m["classification_report"]
    rows = "\n".join(f"| {c} | {rep[c]['precision']:.4f} | {rep[c]['recall']:.4f} | {rep[c]['f1-score']:.4f} |"
                     for c in ckpt["class_names"])
    tc = ckpt["train_config"]
    if ckpt["model"] == ENSEMBLE:
        mc = ckpt["model_config"]
        arch = (f"an ensemble of {mc['n']} `{mc['member']}` networks {json.dumps(mc['member_config'])}, trained from "
                f"seeds {', '.join(str(m['seed']) for m in ckpt['members'])} on one validation split (split seed "
                f"{tc['split_seed']}); its output is the mean of their log-probabilities (`fmnist ensemble`)")
        epochs = f"{', '.join(str(e) for e in ckpt['epoch'])} of {tc['epochs']} (each member's best validation accuracy)"
        trained = f"`{args.command}` (fmnist commit `{env.get('git_commit')}` for the first member)"
    else:
        arch = f"`{ckpt['model']}` {json.dumps(ckpt['model_config'])}"
        epochs = f"{ckpt['epoch']} of {tc['epochs']} (best validation accuracy)"
        trained = f"`{args.command}` (run `{args.run_dir.name}`, fmnist commit `{env.get('git_commit')}`)"
    # The conversion is part of what the model learned: after a change to robust.py the shipped
    # weights saw other images than predict now makes, until it is retrained.
    real_line = (f"- real photos: `{tc['real_photos']}` (dev and train splits), {tc['real_repeat']} times per epoch, "
                 "converted by that commit's robust pipeline\n"
                 if tc.get("real_photos") else "")
    card = f"""# The model shipped with fmnist

`default.pt` is what `fmnist predict` and `fmnist serve` use when no `--checkpoint` is given.

- trained by: {trained}
- architecture: {arch}
- epochs: {epochs}, flip TTA: {tc['tta_flip']}
- validation accuracy: {ckpt['metrics']['val_acc']:.4f} (stratified 10% hold-out of the training set)
- **test accuracy: {m['test_acc']:.4f}**, test loss {m['test_loss']:.4f} (10,000 images, `fmnist evaluate`)
- training time: {summary['train_seconds']:.0f} s{' (all members)' if summary.get('members') else ''} on {env['cpu']} ({env['threads']} threads), torch {env['torch']}
- augmentation: {json.dumps(ckpt['train_config']['augment'])} (photo = fraction of images given real-photo
  artefacts, pairs = shoe images made into pairs; see augment.py)
{real_line}- calibration (`fmnist calibrate`, fitted on validation): temperature {cal['temperature']:.3f}, unsure below
  {cal['threshold']:.1%} top probability; test ECE {cal['test_ece_before']:.4f} -> {cal['test_ece_after']:.4f}

| class | precision | recall | F1 |
|---|---|---|---|
{rows}
"""
    write_text(assets / "MODEL_CARD.md", card)
    print(f"shipped {args.run_dir / 'best.pt'} -> {assets / 'default.pt'} (test acc {m['test_acc']:.4f})")


if __name__ == "__main__":
    main()
