"""Evaluation: the test-set report, temperature scaling with the unsure threshold, pictures."""

from pathlib import Path


def evaluate(path, device: str = "auto", dataset=None) -> dict:
    """Test-set metrics of a run directory (its best.pt) or of a checkpoint file."""
    from fmnist.evaluation.evaluate import evaluate_checkpoint, evaluate_run

    return evaluate_run(path, device=device, dataset=dataset) if Path(path).is_dir() \
        else evaluate_checkpoint(path, device=device, dataset=dataset)
