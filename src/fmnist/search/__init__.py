"""Visual search: embeddings from the model's penultimate features, a catalogue index on a
vector-search engine (FAISS by default), and "more like this" queries.

    from fmnist.search import build_index, similar
    build_index("fashion-mnist:train", "catalogue/")          # or a folder of product photos
    similar(["shoe.jpg"], "catalogue/", k=8)[0].neighbours     # [Neighbour(id, distance, ...), ...]
"""

from fmnist.search.catalogue import add_to_index, build_index, similar

__all__ = ["add_to_index", "build_index", "similar"]
