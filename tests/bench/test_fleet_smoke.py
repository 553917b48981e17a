"""Figure 6 (bench/fleet_scale.py, bench/fig_fleet.py) in smoke mode: 20 simulated devices,
each with its own certificate, against `keel cloud serve` with the embedded broker, as it
starts by default (running Mosquitto), and as two instances on PostgreSQL, each followed by
the bare-Mosquitto baseline; one run each (about 30 s). The
devices' describes reach the registry, their events reach a real `keel subscribe`, and the
figure's rows are well-formed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import fig_fleet, fleet_scale  # noqa: E402
from bench.common import check_row  # noqa: E402

N = 20


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    out = tmp / "results.json"
    env = dict(os.environ, KEEL_BENCH_CACHE=str(tmp / "cache"))  # identities issued afresh
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_scale.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("setup", ["mosquitto", "instances"])
def test_mosquitto_holds_every_device_and_the_registry_has_them(results, setup):
    """The default (serve runs Mosquitto) and two instances on PostgreSQL."""
    (keel,) = results[setup]["keel"]
    assert keel["devices"] == N and keel["connected"] == N and keel["connect_failures"] == {}
    assert keel["held"] == N and keel["held_end"] == N
    assert keel["online_listed"] == N  # GET /api/devices, what keel list --json shows
    assert keel["ramp_describe_recorded"] == N
    assert keel["describe_describes"] > 0 and keel["describe_recorded"] == keel["describe_describes"]
    assert not keel["describe_p99_censored"] and 0 < keel["describe_p99_ms"] < 5000


def test_events_reach_keel_subscribe(results):
    for setup in ("mosquitto", "embedded", "instances"):
        (keel,) = results[setup]["keel"]
        assert keel["events_sent"] > 0
        assert keel["events_received"] > 0 and keel["events_per_s"] > 0, keel
    for setup in ("mosquitto", "instances"):
        (keel,) = results[setup]["keel"]
        assert keel["events_received"] == keel["events_sent"]


def test_the_baseline_subscriber_sees_everything(results):
    for setup in ("mosquitto", "embedded", "instances"):
        (base,) = results[setup]["baseline"]
        assert base["setup"] == "bare" and base["held"] == N
        assert base["ramp_describe_recorded"] == N
        assert base["describe_recorded"] == base["describe_describes"] > 0
        assert base["events_received"] == base["events_sent"] > 0


def test_the_embedded_broker_accounts_for_every_device(results):
    # amqtt 0.12 may drop a few connections under concurrent connects (see the figure's
    # limits); every device is still connected, dropped or reconnecting.
    (keel,) = results["embedded"]["keel"]
    assert keel["connected"] + sum(keel["connect_failures"].values()) == N
    # At this size amqtt keeps nearly all of them after the hold (figure 6 holds all
    # 1,000): a broker that held none, or a few, fails here.
    assert keel["held"] >= N - 2, keel


def test_the_figure_rows_are_well_formed(results):
    for setup in ("embedded", "mosquitto", "instances"):
        rows = fig_fleet.rows_for(setup, results[setup])
        assert len(rows) == 5
        for r in rows:
            assert check_row(r) == [], r
            assert r["figure"] == 6
            assert r["keel"] is not None and r["baseline"] is not None, r
        held, p99 = rows[0], rows[1]
        assert held["goal"] and p99["goal"] == "< 50 ms"


def test_500_devices_reconnecting_at_once_lose_nothing(tmp_path, monkeypatch):
    """A fleet coming back at once (5,000/s: as fast as the workers connect), against
    `keel cloud serve` as it starts by default: every device held, every first describe
    in the registry after the hold, every event through `keel subscribe`. (10,000 at
    500/s is figure 6's ramp.)"""
    monkeypatch.setenv("KEEL_BENCH_CACHE", str(tmp_path / "cache"))
    out = fleet_scale.one_run("mosquitto", 500, tmp_path / "run", ramp=5000, hold=2.0, describe_rate=50,
                              describe_s=1.0, events_rate=500, events_s=1.0, drain=10.0, say=lambda text: None)
    assert out["connected"] == out["held"] == out["held_end"] == 500, out
    assert out["online_listed"] == 500
    assert out["ramp_describe_recorded"] == 500, out
    assert out["describe_recorded"] == out["describe_describes"] > 0
    assert out["events_received"] == out["events_sent"] > 0, out
