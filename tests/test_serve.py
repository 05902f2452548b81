"""The API against a real server process on loopback, including every bad-request case."""

import concurrent.futures
import io
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from fmnist.models import checkpoint
from fmnist.classes import CLASS_NAMES
from fmnist.photos import render_product_photo
from fmnist.inference.predict import default_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra, env=None, **popen):
    """`fmnist serve` on a free port, its output on a pipe unless `popen` says (stdout=FILE)."""
    port = free_port()
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", "--port", str(port), "--log-level", "warning",
                             *extra], env=env, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + (proc.stdout.read() if proc.stdout else "see its log"))
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 60 s")


IDLE = 1000   # connections that send nothing, and as many that send half a head


def low_open_files_limit():
    """A server's soft limit on open files as systemd and most shells leave it (1,024), so a
    test shows that the server raises its own (it needs one file per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-upload-mb", "2", preexec_fn=low_open_files_limit)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def many_open_files():
    """This process may open 2 x IDLE + 500 files while the test runs (its soft limit raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * IDLE + 500
    if hard != resource.RLIM_INFINITY and hard < need:  # the server, its own process, as many
        pytest.skip(f"needs {need:,} open files, and the hard limit (ulimit -Hn) is {hard:,}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def photo_jpeg() -> bytes:
    """A product photo (a test image on a background, JPEG) from the package's own samples."""
    from fmnist.serving.app import load_samples

    return render_product_photo(load_samples()[0][0], np.random.default_rng(0))


def check_answers_beside_idle_connections(url: str) -> None:
    """IDLE connections that send nothing and IDLE with half a request head, all open while a
    new client asks for /healthz and a photo's prediction: each answered 200 within 1 s."""
    port = int(url.rsplit(":", 1)[1])
    socks = []
    try:
        for i in range(2 * IDLE):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            if i >= IDLE:
                socks[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        photo = {"content": photo_jpeg(), "headers": {"content-type": "image/jpeg"}}
        for method, path, kw in [("GET", "/healthz", {}), ("POST", "/v1/predict", photo)]:
            t = time.monotonic()
            r = httpx.request(method, url + path, timeout=5, **kw)
            took = time.monotonic() - t
            assert r.status_code == 200 and took < 1, (path, r.status_code, f"{took:.2f} s", r.text[:300])
        for s in socks:  # all still held by the server: nothing sent back, not closed
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1, socket.MSG_PEEK)
    finally:
        for s in socks:
            s.close()


def test_idle_connections_do_not_starve_the_server(server, many_open_files):
    """Before: uvicorn's --limit-concurrency counted connections, so 260 that sent nothing made
    every request 503 (/healthz too) until the head deadline closed them; and a server left at
    its shell's 1,024 open files could hold no more than that."""
    check_answers_beside_idle_connections(server)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_health_model_docs(server):
    health = httpx.get(server + "/healthz").json()
    assert health["status"] == "ok" and health["batcher"]["alive"] is True
    m = httpx.get(server + "/v1/model").json()
    meta = checkpoint.load(default_checkpoint())
    assert m["classes"][0] == "T-shirt/top" and m["parameters"] > 1000
    mc = meta["model_config"]   # the shipped ensemble is described by its members
    assert (m["name"], m["description"]) == ("ensemble", f"ensemble of {mc['n']} {mc['member']}")
    assert m["accuracy"] == meta["metrics"]["test_acc"]  # reports the served file's own figure
    assert m["accuracy_of"] == "this model"
    assert m["threads"] == 1  # inference keeps to one core: conversions and the event loop need the rest
    assert httpx.get(server + "/docs").status_code == 200
    assert "/v1/predict" in httpx.get(server + "/openapi.json").json()["paths"]


def test_predict_test_images_and_photos(server, dataset):
    """Several files in one request: dataset images and product-photo renderings of them."""
    rng = np.random.default_rng(0)
    idx = [0, 1, 2, 3, 4, 5]
    files = [("files", (f"t{i}.png", png(dataset.test_images[i].numpy()), "image/png")) for i in idx]
    files += [("files", (f"p{i}.jpg", render_product_photo(dataset.test_images[i].numpy(), rng), "image/jpeg"))
              for i in idx]
    r = httpx.post(server + "/v1/predict", files=files, params={"top_k": 3, "include_image": True})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 12 and all(len(p["top"]) == 3 for p in preds)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    truth = [names[int(dataset.test_labels[i])] for i in idx] * 2
    assert sum(p["label"] == t for p, t in zip(preds, truth)) >= 10
    assert preds[0]["preprocessed"].startswith("data:image/png;base64,")


def test_a_28x28_dataset_image_in_colour_modes_is_used_as_is(server, dataset):
    """RGB, RGBA and palette PNGs of Fashion-MNIST images are what their L PNGs are: the model
    sees the image itself, not a photo conversion of it."""
    import base64

    from conftest import grey_pngs

    x = dataset.test_images[:4].numpy()
    files = [("files", (f"{i}-{mode}.png", data, "image/png")) for i, a in enumerate(x)
             for mode, data in grey_pngs(a).items()]
    r = httpx.post(server + "/v1/predict", files=files, params={"include_image": True})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    seen = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p["preprocessed"].split(",", 1)[1])))) for p in preds]
    assert all(np.array_equal(s, x[i // 4]) for i, s in enumerate(seen)), [p["filename"] for p in preds]
    assert all(p["top"] == preds[i - i % 4]["top"] for i, p in enumerate(preds))


def test_raw_body_is_the_image(server, dataset):
    """Content-Type image/*: the body is the image, no multipart, same answer as multipart."""
    rng = np.random.default_rng(1)
    photo = render_product_photo(dataset.test_images[3].numpy(), rng)
    raw = httpx.post(server + "/v1/predict", content=photo, headers={"content-type": "image/jpeg"},
                     params={"top_k": 2, "include_image": True})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json", raw.text
    form = httpx.post(server + "/v1/predict", files={"files": ("p.jpg", photo, "image/jpeg")},
                      params={"top_k": 2, "include_image": True})
    (a,), (b,) = raw.json()["predictions"], form.json()["predictions"]
    assert a["filename"] == "image" and len(a["top"]) == 2
    assert {k: v for k, v in a.items() if k != "filename"} == {k: v for k, v in b.items() if k != "filename"}
    octet = httpx.post(server + "/v1/predict", content=png(dataset.test_images[0].numpy()),
                       headers={"content-type": "application/octet-stream"})
    assert octet.status_code == 200 and octet.json()["predictions"][0]["label"] == "Ankle boot"


@pytest.mark.parametrize("ctype,body,status,code", [
    ("image/png", b"", 400, "empty_file"),
    ("image/png", b"just some text", 415, "unsupported_media_type"),
    # Before: 422. A Content-Type that carries no images is 415, with how to send them.
    ("application/json", b'{"image": "x"}', 415, "unsupported_media_type"),
    ("text/plain", b"abc", 415, "unsupported_media_type"),
    ("application/x-www-form-urlencoded", b"files=abc", 415, "unsupported_media_type"),
    (None, b"abc", 415, "unsupported_media_type"),
])
def test_bad_raw_bodies_get_4xx_json(server, ctype, body, status, code):
    r = httpx.post(server + "/v1/predict", content=body, headers={"content-type": ctype} if ctype else {})
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    if ctype != "image/png":
        assert "Content-Type image/*" in r.json()["error"]["message"] and "multipart" in r.json()["error"]["message"]


def test_unsupported_format_message_lists_exactly_what_is_accepted(server):
    """Before: the message for a file that is no image offered PPM/PGM, and a PPM upload then
    got 415. Now both messages name the formats of /v1/model, and each of those is served."""
    formats = httpx.get(server + "/v1/model").json()["limits"]["formats"]
    ppm = io.BytesIO()
    Image.new("L", (28, 28)).save(ppm, format="PPM")
    for body in (b"just some text", ppm.getvalue()):
        r = httpx.post(server + "/v1/predict", files={"files": ("x.png", body, "image/png")})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
        listed = r.json()["error"]["message"].rsplit("(", 1)[1].rstrip(")").split(", ")
        assert sorted(name.upper() for name in listed) == formats, r.text
    for fmt in formats:
        buf = io.BytesIO()
        Image.new("L", (28, 28)).save(buf, format=fmt)
        r = httpx.post(server + "/v1/predict", files={"files": (f"x.{fmt.lower()}", buf.getvalue(), "image/png")})
        assert r.status_code == 200, (fmt, r.text)


def test_a_heic_photo_gets_415_with_how_to_send_it(server):
    """An iPhone's HEIC photo is no format the server opens: 415, saying to send a JPEG."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    for r in (httpx.post(server + "/v1/predict", files={"files": ("IMG_0001.HEIC", heic, "image/heic")}),
              httpx.post(server + "/v1/predict", content=heic, headers={"content-type": "image/heic"})):
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
        assert "HEIC/HEIF" in r.json()["error"]["message"] and "JPEG" in r.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_accurate(server, dataset):
    """128 single-image requests from 16 clients at once: the batcher serves them in fewer
    forward passes than requests (its counters in /healthz; with --max-batch 1 they stay at 0,
    so this fails with batching off), and the answers are right as often as the model is."""
    n = 128
    bodies = [png(dataset.test_images[i].numpy()) for i in range(n)]
    truth = [CLASS_NAMES[int(dataset.test_labels[i])] for i in range(n)]
    before = httpx.get(server + "/healthz").json()["batcher"]

    def one(i):
        r = httpx.post(server + "/v1/predict", files={"files": (f"{i}.png", bodies[i], "image/png")})
        return r.status_code, r.json()["predictions"][0]["label"]

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(n)))
    after = httpx.get(server + "/healthz").json()["batcher"]
    assert [code for code, _ in results] == [200] * n
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    print(f"{n} requests: {batches} forward passes")
    assert items == n and 0 < batches < n
    acc = sum(label == t for (_, label), t in zip(results, truth)) / n
    assert acc > 0.87, acc  # the shipped model measures 93.9 %; 128 images, standard error ~2.1 points


@pytest.mark.parametrize("case,status,code", [
    ("not_image", 415, "unsupported_media_type"),
    ("empty", 400, "empty_file"),
    ("truncated", 400, "bad_image"),
    ("too_big", 413, "payload_too_large"),
    ("too_many_pixels", 413, "too_many_pixels"),
    ("no_files", 422, "invalid_request"),
    ("too_many_files", 413, "too_many_files"),
    ("bad_top_k", 422, "invalid_request"),
    ("transparent", 422, "unprocessable_image"),
])
def test_bad_requests_get_4xx_json(server, case, status, code):
    ok = png(np.zeros((28, 28), np.uint8))
    params = {}
    if case == "not_image":
        files = {"files": ("notes.txt", b"just some text", "text/plain")}
    elif case == "empty":
        files = {"files": ("empty.png", b"", "image/png")}
    elif case == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (200, 200), "white").save(buf, format="JPEG")
        files = {"files": ("cut.jpg", buf.getvalue()[:300], "image/jpeg")}
    elif case == "too_big":
        files = {"files": ("big.bin", os.urandom(3 << 20), "image/png")}
    elif case == "too_many_pixels":
        buf = io.BytesIO()
        Image.new("1", (6000, 5000)).save(buf, format="PNG")  # tiny file, 30 MP decoded
        files = {"files": ("bomb.png", buf.getvalue(), "image/png")}
    elif case == "no_files":
        files = {"x": (None, b"1")}  # multipart: a text field, no 'files'
    elif case == "too_many_files":
        files = [("files", (f"{i}.png", ok, "image/png")) for i in range(17)]
    elif case == "bad_top_k":
        files, params = {"files": ("a.png", ok, "image/png")}, {"top_k": 0}
    elif case == "transparent":
        buf = io.BytesIO()
        Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(buf, format="PNG")
        files = {"files": ("clear.png", buf.getvalue(), "image/png")}
    r = httpx.post(server + "/v1/predict", files=files, params=params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 10 and "Traceback" not in r.text
    assert httpx.get(server + "/healthz").status_code == 200  # still up


def test_unknown_route_is_json_404(server):
    r = httpx.get(server + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_samples_and_page_assets(server):
    s = httpx.get(server + "/v1/samples", params={"n": 5}).json()["samples"]
    assert len(s) == 5 and s[0]["image"].startswith("data:image/png")
    page = httpx.get(server + "/").text
    assert "/static/app.js" in page and "http://" not in page and "https://" not in page  # no CDN
    for asset in ("/static/app.js", "/static/app.css"):
        assert httpx.get(server + asset).status_code == 200


def test_similar_without_an_index_says_how_to_enable_it(server):
    assert httpx.get(server + "/v1/index").json() == {"enabled": False}
    r = httpx.post(server + "/v1/similar", files={"files": ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png")})
    assert r.status_code == 404 and r.json()["error"]["code"] == "search_disabled"
    assert "fmnist serve --index" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/thumbnails/0").status_code == 404
