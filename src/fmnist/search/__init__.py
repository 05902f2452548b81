"""Visual search: embeddings from the model's penultimate features, a catalogue index on a
vector-search engine (FAISS by default), and "more like this" queries.

    from fmnist.search import build_index, similar
    build_index("fashion-mnist:train", "catalogue/")          # or a folder of product photos
    similar(["shoe.jpg"], "catalogue/", k=8)[0].neighbours     # [Neighbour(id, distance, ...), ...]

The names are imported on first use: `fmnist.search.index` (the engines and the on-disk index)
then loads without torch, as a process that only opens or measures an index needs.
"""

__all__ = ["add_to_index", "build_index", "similar"]


def __getattr__(name: str):
    if name in __all__:
        from fmnist.search import catalogue

        value = getattr(catalogue, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmnist.search' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
