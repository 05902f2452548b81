"""The server's visual search: routes added to app.py's app when it runs with `--index DIR`.

  POST /v1/similar          the same upload forms and limits as /v1/predict; `k` (1..K_MAX)
                            nearest catalogue items per image, each with a thumbnail URL
  GET  /v1/index            whether search is on, and the index's size, engine and sources
  GET  /v1/thumbnails/{id}  an item's thumbnail (PNG), read from the index by integer id only

Without an index, /v1/similar answers 404 JSON saying how to enable it. Embedding and search run
in one thread of their own (the server's inference thread count), beside the batcher's.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response

from fmnist.search.index import SearchIndexError

log = logging.getLogger(__name__)

K_MAX = 32   # neighbours per image: a page shows a handful; more is a bulk export, not a search


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def mount(app: FastAPI, *, index, embedder, cfg, slots, converters, prepare, uploads, png_data_url,
          body: dict) -> None:
    """Add the search routes to `app`. index: an open CatalogueIndex checked against the served
    model, or None (search off); prepare/uploads/png_data_url/body: app.py's upload helpers and
    request schema, so /v1/similar reads and converts uploads exactly as /v1/predict does."""
    searcher = ThreadPoolExecutor(1, thread_name_prefix="fmnist-search") if index is not None else None
    if index is not None:
        index.items()   # read now: a damaged items file fails the start, not the first request

    def unavailable():
        return HTTPException(404, detail=("search_disabled", "this server has no catalogue index: start it with "
                                                             "`fmnist serve --index DIR` (build DIR with "
                                                             "`fmnist index build SOURCE --out DIR`)"))

    def search(images: np.ndarray, k: int):
        vectors = embedder.embed_images(images)
        probs = embedder.predictor.probabilities(images)
        return index.search(vectors, k), probs

    @app.get("/v1/index", summary="The catalogue index behind /v1/similar, if any")
    async def index_info():
        if index is None:
            return {"enabled": False}
        return {"enabled": True, "count": len(index), "engine": index.engine_name, "sources": index.sources,
                "model": index.model.get("description"), "k_max": K_MAX}

    @app.get("/v1/thumbnails/{item_id}", summary="A catalogue item's thumbnail (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def thumbnail(item_id: int):
        if index is None:
            raise unavailable()
        if not 0 <= item_id < len(index):
            raise HTTPException(404, detail=("not_found", f"no catalogue item {item_id}; ids run from 0 to "
                                                          f"{len(index) - 1}"))
        try:
            a = await asyncio.get_running_loop().run_in_executor(searcher, index.thumbnail, item_id)
        except SearchIndexError as e:
            log.error(str(e))
            raise HTTPException(503, detail=("index_unavailable", f"the catalogue index cannot be read: {e}")) from None
        # Thumbnails of an index never change: the id names the same picture for the index's life.
        return Response(_png(a), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/similar", summary="Catalogue items that look most like each image",
              openapi_extra=body)
    async def similar(request: Request,
                      k: int = Query(8, ge=1, le=K_MAX, description="neighbours per image"),
                      include_image: bool = Query(False, description="also return the 28x28 image the model saw")):
        if index is None:
            raise unavailable()
        from fmnist.serving.guards import Busy

        ups = await uploads(request, cfg)
        loop = asyncio.get_running_loop()
        pres = []
        for name, data in ups:
            try:
                async with slots.slot():
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    pres.append(await loop.run_in_executor(converters, prepare, data, name, cfg, embedder.predictor))
            except Busy as e:
                raise HTTPException(503, detail=("busy", f"every image conversion slot ({cfg.max_conversions}) "
                                                         f"stayed busy for {cfg.conversion_wait_s:g} s: retry shortly"),
                                    headers={"Retry-After": str(e.retry_after_s)}) from None
        try:
            found, probs = await loop.run_in_executor(searcher, search, np.stack([p.image for p in pres]), k)
        except SearchIndexError as e:
            log.error(str(e))
            raise HTTPException(503, detail=("index_unavailable", f"the catalogue index cannot be read: {e}")) from None
        names = embedder.predictor.class_names
        out = []
        for (name, _), pre, nbs, p in zip(ups, pres, found, probs):
            item = {"filename": name, "label": names[int(np.argmax(p))], "probability": float(p.max()),
                    "neighbours": [{**n.to_dict(), "thumbnail": f"/v1/thumbnails/{n.id}"} for n in nbs]}
            if include_image:
                item["preprocessed"] = png_data_url(pre.image)
            out.append(item)
        return Response(json.dumps({"results": out, "index": {"count": len(index), "engine": index.engine_name}}
                                   ).encode(), media_type="application/json")
