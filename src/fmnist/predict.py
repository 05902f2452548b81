"""Deprecated home of Predictor: `from fmnist import Predictor` (or fmnist.inference.predict)."""

import warnings

from fmnist.inference.predict import Predictor, default_checkpoint, format_table

warnings.warn("fmnist.predict moved to fmnist.inference.predict; import Predictor as `from fmnist import "
              "Predictor`. The old path goes in the next release.", DeprecationWarning, stacklevel=2)

__all__ = ["Predictor", "default_checkpoint", "format_table"]
