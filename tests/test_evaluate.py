"""The test-set report is scikit-learn's classification report and confusion matrix, computed
with NumPy (fmnist.evaluation.evaluate): checked against scikit-learn itself."""

import pytest
import torch

from fmnist.classes import CLASS_NAMES
from fmnist.evaluation.evaluate import compute_metrics, report_text



@pytest.mark.parametrize("case", ["random", "a class never true", "a class never predicted", "all right"])
def test_report_and_confusion_matrix_are_scikit_learns(case):
    metrics = pytest.importorskip("sklearn.metrics")   # here, not at collection: 1.3 s per xdist worker
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (500,), generator=g)
    logits = torch.randn(500, 10, generator=g)
    logits[torch.arange(500), y] += 1.0   # better than chance, not perfect
    if case == "a class never true":
        y[y == 3] = 4
    if case == "a class never predicted":
        logits[:, 6] = -1e9
    if case == "all right":
        logits[torch.arange(500), y] += 1e3
    got = compute_metrics(logits, y)
    pred = logits.argmax(1).numpy()
    labels = list(range(len(CLASS_NAMES)))
    want = metrics.classification_report(y.numpy(), pred, labels=labels, target_names=list(CLASS_NAMES),
                                          digits=4, output_dict=True, zero_division=0)
    assert got["classification_report"].keys() == want.keys()
    assert got["classification_report"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    for name in (*CLASS_NAMES, "macro avg", "weighted avg"):
        for k in ("precision", "recall", "f1-score", "support"):
            assert got["classification_report"][name][k] == pytest.approx(want[name][k], abs=1e-12), (name, k)
    assert got["confusion_matrix"] == metrics.confusion_matrix(y.numpy(), pred, labels=labels).tolist()
    assert got["test_acc"] == pytest.approx(want["accuracy"])
    text = report_text(got)   # what fmnist evaluate prints: scikit-learn's own layout and figures
    assert text.split() == metrics.classification_report(y.numpy(), pred, labels=labels, target_names=list(CLASS_NAMES),
                                                          digits=4, zero_division=0).split()
