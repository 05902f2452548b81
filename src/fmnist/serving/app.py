"""`fmnist serve`: an HTTP API and a web page in front of a model.

  POST /v1/predict   multipart field `files` (one or several images), or one image as the raw
                     body (Content-Type image/*) -> top-k per image
  GET  /v1/model     name, classes, parameters, accuracy
  GET  /v1/samples   random test images for the page's strip
  POST /v1/similar   with --index: the catalogue items most like each image (serve_search.py)
  GET  /healthz      liveness: 503 when inference cannot run; batcher, conversion and request
                     counters of the process that answered (its pid: with --workers, each has its own);
                     never refused for load (HEAD too, as on /)
  GET  /docs         OpenAPI (Swagger UI, served locally)
  GET  /             the web page (every asset served by this app: no CDN, no font service)

Preprocessing runs in a thread pool (at most `max_conversions` at once) and inference in the
dynamic batcher's thread, so the event loop only moves bytes. Every bad request gets a 4xx
JSON error {"error": {code, message}}; overload gets 503 with Retry-After. Limits on bodies,
requests in progress and slow clients live in guards.py and httpserver.py. `--workers N` runs
N such processes on one port (workers.py), and starts another where one dies.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match, Router

from fmnist.serving.batcher import BatcherUnavailable, DynamicBatcher
from fmnist.serving.guards import Busy, ConversionSlots, RequestCount, RequestGuard, RequestLimit
from fmnist.serving.httpserver import listen_socket
from fmnist.inference.predict import Predictor
from fmnist.photos.preprocess import AVIF, Preprocessed, PreprocessError, UnsupportedFormatError, format_names, open_image

log = logging.getLogger(__name__)

# The Pillow plugins tried on an upload: preprocess.OPEN_FORMATS less PPM/PGM, which no browser
# or phone sends. JPEG also opens MPO (phone JPEGs).
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", *AVIF, "BMP", "TIFF")


@dataclass
class ServeConfig:
    max_batch: int = 32              # dynamic batching: most images per forward pass; 1 = off
    max_wait_ms: float = 2.0         # longest a request waits for company before its batch runs
    max_upload_bytes: int = 10 << 20  # whole request body
    max_files: int = 16              # per request
    max_pixels: int = 25_000_000     # per image (decoded), against decompression bombs
    body_timeout_s: float = 60.0     # whole request body; 10 MiB in 60 s needs ~1.4 Mbit/s
    inference_timeout_s: float = 30.0  # a request's wait for the batcher before 503
    # A photo costs up to ~1 s of CPU and hundreds of MB while converting: one per core.
    max_conversions: int = max(1, os.cpu_count() or 1)
    conversion_wait_s: float = 2.0   # a request's wait for a free conversion slot before 503
    # Requests in progress (not connections: idle ones cost no work); past it 503 + Retry-After.
    # 64 load-test clients fit; /healthz is never refused.
    limit_concurrency: int = 256
    keep_alive_s: float = 5.0        # idle keep-alive connection closed after this (uvicorn's default)
    header_timeout_s: float = 10.0   # request head, from its first byte (httpserver.py)
    max_head_bytes: int = 64 << 10   # request line + headers, counted as they arrive; past it 431
    # Inference threads (torch intra-op; ONNX Runtime's pool, which otherwise takes a thread per
    # core and spins between calls): the conversions and the event loop need the other cores.
    threads: int = 1
    http: str = "auto"               # httptools where installed (a C parser), else h11
    loop: str = "auto"               # uvloop where installed, else asyncio (uvicorn's choice)


def _err(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def png_data_url(img28: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img28, "L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load_samples() -> tuple[np.ndarray, np.ndarray]:
    """Test-set images shipped with the package (the dataset itself may not be installed)."""
    with resources.files("fmnist").joinpath("assets/samples.npz").open("rb") as f:
        z = np.load(f)
        return z["images"], z["labels"]


def _prepare(data: bytes, name: str, cfg: ServeConfig, predictor: Predictor) -> Preprocessed:
    """Upload bytes -> Preprocessed (28x28 uint8 and whether an item was found), converted as
    `fmnist predict` converts; raises HTTPException with a 4xx a person can act on."""
    if not data:
        raise HTTPException(400, detail=("empty_file", f"{name}: the file is empty (0 bytes)"))
    try:
        # Decoded as `fmnist predict` decodes (JPEGs reduced for the robust conversion), with the
        # server's own pixel limit. Only the accepted formats are tried: anything else, PPM
        # included, is "not an image in an accepted format (...)", which names them.
        img = open_image(data, max_pixels=cfg.max_pixels, draft=predictor.draft_size(), formats=ACCEPTED_FORMATS)
    except UnsupportedFormatError as e:
        raise HTTPException(415, detail=("unsupported_media_type", f"{name}: {str(e).removeprefix('image: ')}")
                            ) from None
    except PreprocessError as e:
        msg = str(e).removeprefix("image: ")
        if "limit" in msg:
            raise HTTPException(413, detail=("too_many_pixels", f"{name}: {msg}")) from None
        raise HTTPException(400, detail=("bad_image", f"{name}: {msg}")) from None
    try:
        return predictor.prepare(img)
    except PreprocessError as e:
        raise HTTPException(422, detail=("unprocessable_image", f"{name}: {str(e).removeprefix('image: ')}")) from None


# Both ways to send images, for the OpenAPI page (the handler reads the body itself).
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": f"image files ({format_names(ACCEPTED_FORMATS)})"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"},
                "description": "one image as the whole body, e.g. Content-Type: image/jpeg"}}}}
RAW_TYPES = ("image/", "application/octet-stream")
HOW_TO_SEND = ("send images as multipart/form-data field 'files' (curl -F files=@photo.jpg URL/v1/predict), "
               "or one image as the body with Content-Type image/* (curl --data-binary @photo.jpg "
               "-H 'Content-Type: image/jpeg' URL/v1/predict)")
BAD_MULTIPART = ("the multipart/form-data body could not be parsed: send images as form field 'files', "
                 "e.g. curl -F files=@photo.jpg URL/v1/predict")


class _MultipartParser(MultiPartParser):
    """starlette's parser, noting whether the closing boundary arrived: without it, a part cut
    off at the end of the body is dropped without a word (then 'files: field required')."""
    complete = False

    def on_end(self) -> None:
        self.complete = True


async def _read_form(request: Request) -> FormData:
    """The multipart body, parsed as request.form() does (starlette's caps: 1,000 files and
    fields, 1 MiB a text field; the body cap bounds the bytes), refusing an unfinished one."""
    async with aclosing(request.stream()) as stream:
        parser = _MultipartParser(request.headers, stream)
        try:
            form = await parser.parse()
        except MultiPartException:
            raise HTTPException(400, detail=("invalid_multipart", BAD_MULTIPART)) from None
    if not parser.complete:
        await form.close()
        raise HTTPException(400, detail=("invalid_multipart", "the multipart/form-data body ends before its closing "
                                         "boundary line, so its last part is cut off: send the whole body (curl -F "
                                         "files=@photo.jpg URL/v1/predict does)"))
    return form


async def _uploads(request: Request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in the request: the raw body (Content-Type image/*), or the
    multipart field `files`. A raw body skips multipart parsing and the upload's spooled file
    (a few percent of a small image's CPU time: bench/cpu/serve/profile.md)."""
    if "content-length" not in request.headers and "transfer-encoding" not in request.headers:
        # Without either, a request has no body (an HTTP/1.0 client may mean "until I close").
        raise HTTPException(411, detail=("length_required", f"the request has no Content-Length header (nor "
                                                            f"Transfer-Encoding: chunked), so no body: {HOW_TO_SEND}"))
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype.startswith(RAW_TYPES):
        return [("image", await request.body())]
    if ctype != "multipart/form-data":  # 415: the body is in a format this route does not take
        sent = f"Content-Type {ctype}" if ctype else "a request without Content-Type"
        raise HTTPException(415, detail=("unsupported_media_type", f"{sent} carries no images: {HOW_TO_SEND}"))
    form = await _read_form(request)
    try:
        files = form.getlist("files")
        if not files:
            raise HTTPException(422, detail=("invalid_request", f"files: field required: {HOW_TO_SEND}"))
        if len(files) > cfg.max_files:
            raise HTTPException(413, detail=("too_many_files", f"{len(files)} files; at most {cfg.max_files} "
                                                               "per request"))
        out = []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise HTTPException(422, detail=("invalid_request", f"files: item {i + 1} is a text field, "
                                                                    f"not a file: {HOW_TO_SEND}"))
            out.append((f.filename or f"file {i + 1}", await f.read()))
        return out
    finally:
        await form.close()


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package, so /docs works with no CDN."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="fmnist API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _slash_redirect(router: Router):
    """The router's handler for a path no route matches: a 307 to the same path with its
    trailing slash added or dropped where that one matches (as starlette's own redirect),
    with a Location of the path alone: starlette's names the Host header, which the client
    chose (a link to another site from ours, or a poisoned cache)."""
    not_found = router.default

    async def default(scope, receive, send):
        path = scope["path"]
        if scope["type"] == "http" and path != "/":
            other = {**scope, "path": path.rstrip("/") if path.endswith("/") else path + "/"}
            if any(route.matches(other)[0] is not Match.NONE for route in router.routes):
                raw = scope.get("raw_path") or path.encode()
                raw = raw.rstrip(b"/") if raw.endswith(b"/") else raw + b"/"
                # One leading slash: "//host/" would be a link to another host.
                url = "/" + raw.decode("latin-1").lstrip("/")
                if scope.get("query_string"):
                    url += "?" + scope["query_string"].decode("latin-1")
                return await RedirectResponse(url, 307)(scope, receive, send)
        await not_found(scope, receive, send)

    return default


def create_app(predictor: Predictor | None = None, cfg: ServeConfig | None = None, catalogue=None) -> FastAPI:
    """catalogue: an open search_index.CatalogueIndex built with `predictor`'s model (enables
    /v1/similar), or None."""
    cfg = cfg or ServeConfig()
    predictor = predictor or Predictor()
    slots = ConversionSlots(cfg.max_conversions, cfg.conversion_wait_s)
    requests = RequestCount(cfg.limit_concurrency)
    # A batch waits for company only while images are being converted: those are on their way.
    batcher = DynamicBatcher(predictor.probabilities, cfg.max_batch, cfg.max_wait_ms, cfg.inference_timeout_s,
                             incoming=lambda: slots.running)
    # One thread per conversion slot: the slots already bound how many run at once.
    converters = ThreadPoolExecutor(cfg.max_conversions, thread_name_prefix="fmnist-convert")
    samples = load_samples()
    rng = np.random.default_rng()

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        converters.shutdown(wait=False)

    app = FastAPI(title="fmnist", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False,  # _slash_redirect's instead
                  description="Fashion-MNIST classifier: upload clothing photos, get the top classes.")
    app.router.default = _slash_redirect(app.router)
    app.state.batcher = batcher
    app.state.conversions = slots
    static = Path(str(resources.files("fmnist.serving") / "static"))
    app.mount("/static", StaticFiles(directory=static), name="static")
    _mount_docs(app)

    # The last added runs first: RequestGuard sees every answer, RequestLimit's 503 included.
    app.add_middleware(RequestLimit, count=requests, exempt=("/healthz",))
    # Bytes are counted as they arrive: a chunked body ignores its Content-Length header.
    app.add_middleware(RequestGuard, max_body_bytes=cfg.max_upload_bytes, body_timeout_s=cfg.body_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if isinstance(exc.detail, tuple):
            code, msg = exc.detail
        else:
            code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
                exc.status_code, f"http_{exc.status_code}")
            msg = str(exc.detail)
        return _err(exc.status_code, code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}")
        hint = (" (POST images as multipart/form-data field 'files')"
                if request.url.path in ("/v1/predict", "/v1/similar") else "")
        return _err(422, "invalid_request", "; ".join(parts) + hint)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # last resort: still JSON, never a stack trace
        return _err(500, "internal_error", f"the server failed on this request ({type(exc).__name__}); "
                                           "it is still running: try again or report it")

    # HEAD as well as GET: uptime monitors ask with HEAD.
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(static / "index.html")

    @app.get("/healthz", summary="Liveness check: 503 when inference cannot run")
    @app.head("/healthz", include_in_schema=False)  # one operation in the OpenAPI page
    async def healthz():
        state = batcher.state()
        body = {"status": "ok" if state["alive"] else "unavailable", "batcher": state, "conversions": slots.state(),
                "requests": requests.state(), "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if state["alive"] else 503)

    @app.get("/v1/model", summary="The model being served")
    async def model_info():
        m = predictor.meta
        return {"name": m.get("model"), "description": m.get("description"), "classes": predictor.class_names, "parameters": m.get("parameters"),
                "accuracy": m.get("metrics", {}).get("test_acc"), "val_accuracy": m.get("metrics", {}).get("val_acc"),
                # an int8 ONNX file carries its fp32 model's figures: say so beside them
                "accuracy_of": m.get("metrics_of", "this model"),
                "backend": predictor.backend, "threads": predictor.inference_threads(),
                "max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms,
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_files": cfg.max_files,
                           "max_pixels": cfg.max_pixels, "formats": sorted(ACCEPTED_FORMATS)}}

    @app.get("/v1/samples", summary="Random test-set images (PNG data URLs) with their true labels")
    async def sample_images(n: int = Query(8, ge=1, le=32)):
        imgs, labels = samples
        idx = rng.choice(len(imgs), size=n, replace=False)
        return {"samples": [{"id": int(i), "label": predictor.class_names[int(labels[i])],
                             "image": png_data_url(imgs[i])} for i in idx]}

    @app.post("/v1/predict", summary="Classify one or several images", openapi_extra=PREDICT_BODY)
    async def predict(request: Request,
                      top_k: int = Query(3, ge=1, le=10, description="classes per image"),
                      include_image: bool = Query(False, description="also return the 28x28 image the model saw")):
        uploads = await _uploads(request, cfg)
        loop = asyncio.get_running_loop()
        pres = []
        for name, data in uploads:
            try:
                async with slots.slot():
                    # Checked once a slot is ours: a client that left while we waited costs nothing more.
                    if await request.is_disconnected():
                        slots.dropped += len(uploads) - len(pres)
                        log.info("client left: %d conversion(s) dropped", len(uploads) - len(pres))
                        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
                    pres.append(await loop.run_in_executor(converters, _prepare, data, name, cfg, predictor))
            except Busy as e:
                raise HTTPException(503, detail=("busy", f"every image conversion slot ({cfg.max_conversions}) "
                                                         f"stayed busy for {cfg.conversion_wait_s:g} s: retry shortly"),
                                    headers={"Retry-After": str(e.retry_after_s)}) from None
        if await request.is_disconnected():
            log.info("client left before inference: %d image(s) dropped", len(pres))
            return Response(status_code=499)
        try:
            probs = await batcher.submit(np.stack([pre.image for pre in pres]))
        except BatcherUnavailable as e:
            raise HTTPException(503, detail=("inference_unavailable", f"inference is unavailable: {e}"),
                                headers={"Retry-After": "5"}) from None
        out = []
        for (name, _), pre, p in zip(uploads, pres, probs):
            order = np.argsort(-p)[:top_k]
            unsure, reason = predictor.verdict(pre, p)
            item = {"filename": name, "label": predictor.class_names[order[0]], "probability": float(p[order[0]]),
                    "verdict": "unsure" if unsure else "sure", "reason": reason,
                    "top": [{"label": predictor.class_names[j], "probability": float(p[j])} for j in order]}
            if include_image:
                item["preprocessed"] = png_data_url(pre.image)
            out.append(item)
        # Encoded here: FastAPI would first walk the dict through jsonable_encoder.
        return Response(json.dumps({"predictions": out}).encode(), media_type="application/json")

    from fmnist.serving import search as serve_search
    embedder = None
    if catalogue is not None:
        from fmnist.search.embed import Embedder
        embedder = Embedder(predictor=predictor)
        catalogue.check_model(embedder.model_record)
    serve_search.mount(app, index=catalogue, embedder=embedder, cfg=cfg, slots=slots, converters=converters,
                       prepare=_prepare, uploads=_uploads, png_data_url=png_data_url, body=PREDICT_BODY)
    return app


def _config(args) -> ServeConfig:
    # The conversion slots are per process: with several workers, the cores are shared out.
    per_worker = max(1, (os.cpu_count() or 1) // args.workers)
    return ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       max_upload_bytes=args.max_upload_mb << 20,
                       max_conversions=args.max_conversions or per_worker,
                       conversion_wait_s=args.conversion_wait, limit_concurrency=args.limit_concurrency,
                       keep_alive_s=args.keep_alive_timeout, header_timeout_s=args.header_timeout,
                       max_head_bytes=args.max_header_kb << 10,
                       body_timeout_s=args.body_timeout, threads=args.threads, http=args.http, loop=args.loop)


def _raise_open_files_limit() -> int:
    """Each connection is an open file, idle ones too: the soft limit (often 1,024) goes up to
    the hard one (ulimit -Hn; LimitNOFILE= in a systemd unit sets both). Returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a value the soft one may take on Linux (fs.nr_open is).
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft < 4096:
        log.warning(f"this process may open {soft:,} files (ulimit -n), so it can hold at most that many connections, "
                    f"idle ones included: raise the limit (ulimit -n 65536 before starting, or LimitNOFILE=65536 "
                    f"in a systemd unit)")
    return soft


def _serve(args, sock: socket.socket, worker: bool = False, ready=None) -> None:
    """One server process: the model, the app and uvicorn on the bound socket `sock`.
    ready: set once the model has loaded (the supervisor restarts only a worker that served)."""
    import torch
    import uvicorn

    from fmnist.serving.httpserver import protocol_with_head_deadline

    _raise_open_files_limit()
    cfg = _config(args)
    torch.set_num_threads(cfg.threads)
    catalogue = None
    if getattr(args, "index", None):   # before the model: a bad index (or a database not reached) fails at once
        from fmnist.search.index import CatalogueIndex
        catalogue = CatalogueIndex.open(args.index)
    predictor = Predictor(args.checkpoint, backend=args.backend, pipeline=getattr(args, "pipeline", "robust"),
                          threads=cfg.threads)
    app = create_app(predictor, cfg, catalogue)
    protocol = protocol_with_head_deadline(cfg.header_timeout_s, cfg.http, cfg.max_head_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, http=protocol, loop=cfg.loop,
                            # Ours counts requests (RequestLimit); uvicorn's counts connections too.
                            limit_concurrency=None, timeout_keep_alive=cfg.keep_alive_s)
    host = f"[{args.host}]" if ":" in args.host else args.host
    who = f" (worker {os.getpid()})" if worker else ""
    log.info(f"serving {predictor.meta.get('model')} ({predictor.backend}, {cfg.threads} inference thread(s)) on "
             f"http://{host}:{sock.getsockname()[1]}/{who}  API docs: /docs  batching: max {cfg.max_batch}, wait "
             f"{cfg.max_wait_ms} ms  conversions: {cfg.max_conversions} at once  http: {protocol.implementation}")
    if ready is not None:
        ready.set()
    uvicorn.Server(config).run(sockets=[sock])


def main(args, sock: socket.socket | None = None) -> int:
    """One server process (`fmnist serve`; --workers N runs workers.supervise instead). sock: the
    listening socket where the caller bound it already (`fmnist serve` does, before importing this
    module)."""
    # Bound before the model loads, as the workers' sockets are: a port in use or a bad --host
    # is a one-line error (the CLI's), and "serving" is announced only on a socket that is ours.
    sock = sock or listen_socket(args.host, args.port, reuse_port=False)
    try:
        _serve(args, sock)
    finally:
        sock.close()
    return 0
