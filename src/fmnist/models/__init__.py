"""The networks (a registry of named constructors, all returning logits) and their checkpoints."""

from fmnist.models.networks import REGISTRY, create_model


def build_model(name: str, **config):
    """A network by registry name (`seed`, `fast`, `wide`, `wrn`, ...), untrained; keyword
    arguments override its config, e.g. build_model("fast", width=96)."""
    return create_model(name, config or None)


__all__ = ["REGISTRY", "build_model", "create_model"]
