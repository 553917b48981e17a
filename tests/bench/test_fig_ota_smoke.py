"""Figure 4 (bench/fig_ota.py) in smoke mode: an 8 KB image over each profile (a fast
"flaky" that drops once), Keel's OTA and the plain HTTP GET baseline, every row
well-formed (about 15 s). And the baseline's client on its own: it starts over from
byte 0 after a drop and stages the image intact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import KB, check_row  # noqa: E402


@pytest.fixture(scope="module")
def smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--only", "ota", "--json",
                           "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    (fig,) = [f for f in doc["figures"] if f["name"] == "ota"]
    return fig


def test_the_figure_returns_its_three_rows(smoke):
    assert smoke["error"] is None, smoke["error"]
    rows = smoke["rows"]
    assert [r["what"].split(" (")[0] for r in rows] == [
        "goodput, wifi", "goodput, cellular", "bytes sent per image byte, flaky"]
    for r in rows:
        assert check_row(r) == [], r
        assert r["figure"] == 4 and r["goal"] and r["met"] in (True, False)
        assert r["keel"] is not None and r["baseline"] is not None, r
        assert len(r["runs"]["keel"]) == len(r["runs"]["baseline"]) == 1
    wifi, cellular, flaky = rows
    for r in (wifi, cellular):
        assert 0 < r["keel"] < 1.2 and 0 < r["baseline"] < 1.2, r  # fractions of the link rate
    # one drop in the transfer: Keel sends again a little, the GET starts over
    assert flaky["keel"] >= 1.0 and flaky["baseline"] > 1.0, flaky


def test_the_http_baseline_starts_over_after_a_drop(tmp_path):
    from bench.http_baseline import ImageServer, fetch
    from bench.linkshaper import PROFILES, LinkShaper

    image = os.urandom(20 * KB)
    prof = PROFILES["wifi"].but(name="once", drop_every=8 * KB, max_drops=1)
    with ImageServer(image) as server, LinkShaper(0, "127.0.0.1", server.port, prof) as shaper:
        r = fetch(tmp_path, shaper.port, image, max_attempts=3)
        stats = shaper.stats()
    assert r["done"] and r["sha_ok"] and r["attempts"] == 2, r
    assert r["per_attempt"][1] == len(image) and 0 < r["per_attempt"][0] < 8 * KB, r
    assert r["received"] == sum(r["per_attempt"]) and stats["drops"] == 1 and server.requests == 2
