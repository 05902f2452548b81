"""Real photos: the named photo sets (manifests, fetch, verify) and test images rendered as photos."""

from fmnist.photos.render import render_listing, render_product_photo

__all__ = ["render_listing", "render_product_photo"]
