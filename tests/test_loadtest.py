"""`fmnist bench serve`'s load test: wrk's output parsed exactly, a real wrk run and the
Python fallback against a real server, record entries appended and never replaced."""

import json
import os
import shutil

import pytest

from conftest import photo_dir
from fmnist.bench import loadtest
from fmnist.utils.atomic import append_sitting

# wrk 4.1's output with the fmnist script (a real run, 2 connections for 1 s).
WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:37045/v1/predict
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.45ms    7.75ms  61.37ms   95.17%
    Req/Sec   388.70    106.27   525.00     80.00%
  387 requests in 1.00s, 169.65KB read
Requests/sec:    386.61
Transfer/sec:    169.48KB
FMNIST-WRK {"requests": 387, "duration_us": 1001013, "p50_us": 4221, "p90_us": 8866, "p99_us": 50995, \
"max_us": 61367, "mean_us": 6450.0, "errors": {"connect": 0, "read": 0, "write": 0, "status": 3, "timeout": 1}}
"""


def test_parse_wrk_reads_the_exact_figures():
    r = loadtest.parse_wrk(WRK_OUTPUT)
    assert r["requests"] == 387 and r["rps"] == pytest.approx(386.61, abs=0.01)
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"]) == (4.221, 8.866, 50.995, 61.367)
    assert r["errors"] == 4 and r["error_kinds"]["status"] == 3  # non-2xx answers count as errors


def test_parse_wrk_without_the_script_line_says_so():
    with pytest.raises(ValueError, match="no FMNIST-WRK line"):
        loadtest.parse_wrk(WRK_OUTPUT.split("FMNIST-WRK")[0])


@pytest.fixture(scope="module")
def server_port():
    port = loadtest.free_port()
    proc = loadtest.start_server(port, ["--max-conversions", "1"])
    yield port, proc
    loadtest.stop_server(proc)


def png_payloads():
    png = loadtest.sample_png()
    return [loadtest.multipart("png28", png, "x.png", "image/png", "test"),
            loadtest.raw("png28-raw", png, "image/png", "test")]


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed (make installs it)")
@pytest.mark.parametrize("payload", png_payloads(), ids=lambda p: p.name)
def test_wrk_against_a_real_server(server_port, payload):
    r = loadtest.measure(server_port[0], payload, connections=2, seconds=1, tool="wrk")
    assert r["requests"] > 10 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"], r


def test_python_client_against_a_real_server(server_port):
    r = loadtest.measure(server_port[0], png_payloads()[1], connections=2, seconds=1, tool="python")
    assert r["requests"] > 10 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
    assert loadtest.rss_mb(server_port[1].pid) > 50  # a server with torch loaded


def test_photo_payload_is_about_12_8_kb():
    (photo,) = [p for p in loadtest.payloads(photo_dir("real")) if p.name == "photo-raw"]
    assert abs(len(photo.body) - loadtest.PHOTO_BYTES) < 600 and photo.content_type == "image/jpeg"


def test_record_entries_are_appended_never_replaced(tmp_path):
    path = tmp_path / "serve.json"
    assert append_sitting(path, {"n": 1}) == 1
    assert append_sitting(path, {"n": 2}) == 2
    assert json.loads(path.read_text()) == {"sittings": [{"n": 1}, {"n": 2}]}
    assert not [f for f in os.listdir(tmp_path) if f != "serve.json"]  # no temp file left behind
