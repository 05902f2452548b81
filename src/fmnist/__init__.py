"""fmnist: CNNs for Fashion-MNIST, from the lab assignment to serving and export.

The public API (each name is imported on first use, so `import fmnist` stays light and
`fmnist.Predictor` never loads training code):

    ds = fmnist.load_data()                                 # the dataset as uint8 tensors, verified
    model = fmnist.build_model("seed")                       # a registered network, untrained
    cfg = fmnist.preset("fast", epochs=5)                    # a TrainConfig from a preset
    run_dir = fmnist.train(cfg)                              # trains; writes best.pt, history, config
    metrics = fmnist.evaluate(run_dir)                       # test-set report (run dir or checkpoint)
    results = fmnist.Predictor().predict(["photo.jpg"])      # photos, arrays, PIL images, file objects
    fmnist.build_index("fashion-mnist:train", "catalogue")   # a visual-search index (needs fmnist[search])
    fmnist.similar("photo.jpg", "catalogue", k=8)            # its nearest catalogue items
"""

__version__ = "0.1.0"

_API = {
    "load_data": ("fmnist.data", "load"),
    "build_model": ("fmnist.models", "build_model"),
    "TrainConfig": ("fmnist.training.config", "TrainConfig"),
    "preset": ("fmnist.training.config", "preset"),
    "train": ("fmnist.training.train", "train"),
    "evaluate": ("fmnist.evaluation.evaluate", "evaluate"),
    "Predictor": ("fmnist.inference.predict", "Predictor"),
    "build_index": ("fmnist.search", "build_index"),
    "similar": ("fmnist.search", "similar"),
    "CLASS_NAMES": ("fmnist.classes", "CLASS_NAMES"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmnist' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
