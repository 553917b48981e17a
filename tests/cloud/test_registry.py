"""The registry, the same tests against SQLite and against a real PostgreSQL server
(Debian's, started here on a free 127.0.0.1 port with trust authentication for TCP),
and the whole cloud on PostgreSQL when cloud.json names it."""

import secrets
import socket
import threading
import time

import psycopg
import pytest

from keel_cloud import protocol
from keel_cloud import registry as registry_module
from keel_cloud.registry import Registry, RegistryError, Write

DEVICE_KEYS = {"name", "id", "platform", "online", "mode", "system_version", "last_seen", "describe",
               "describe_error", "fleet"}
TABLES = ("events, devices, fleets, fleet_members, rollbacks, app_releases, release_modules, "
          "dropped_messages, instances, leases")
EVENT_KEYS = {"seq", "device", "id", "name", "data", "ts"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_id() -> str:
    return secrets.token_hex(12)


def pg_rows(url: str, sql: str, args=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description is not None else []


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a registry lives: a new SQLite file, or the PostgreSQL database emptied."""
    if request.param == "sqlite":
        return tmp_path / "registry.db"
    url = request.getfixturevalue("postgres_url")
    pg_rows(url, f"DROP TABLE IF EXISTS {TABLES}")
    return url


@pytest.fixture
def reg(target):
    registry = Registry(target)
    yield registry
    registry.close()


def describe(version="1.1.0", mode="normal", platform="virtual"):
    return {
        "platform": platform,
        "mode": mode,
        "modules": [
            {"function": "system-part", "index": 2, "version": "9.9.9"},
            {"function": "system-part", "index": 1, "version": version},
            {"function": "user-part", "index": 1, "version": "0.1.0"},
        ],
    }


# Devices


def test_an_empty_registry(reg):
    assert reg.devices() == []
    assert reg.device("nobody") is None
    assert reg.events() == []
    assert reg.last_event_seq() == 0
    assert not reg.known(new_id())


def test_add_and_rename_a_device(reg):
    device_id = new_id()
    reg.add_device(device_id, "sensor1", "virtual")
    assert reg.known(device_id)
    device = reg.device("sensor1")
    assert device == {"name": "sensor1", "id": device_id, "platform": "virtual", "online": False,
                      "mode": None, "system_version": None, "last_seen": None, "describe": {},
                      "describe_error": None, "fleet": None}
    assert reg.device(device_id) == device

    reg.add_device(device_id, "sensor-renamed")  # the same id: renamed, platform kept
    assert reg.device("sensor1") is None
    renamed = reg.device("sensor-renamed")
    assert (renamed["id"], renamed["platform"]) == (device_id, "virtual")
    assert [d["name"] for d in reg.devices()] == ["sensor-renamed"]

    reg.add_device(device_id, "sensor-renamed", "other")  # a platform given replaces it
    assert reg.device(device_id)["platform"] == "other"


def test_a_name_taken_by_another_device_is_refused(reg):
    first, second = new_id(), new_id()
    reg.add_device(first, "sensor1")
    reg.add_device(second, "sensor2")
    with pytest.raises(RegistryError, match=f"the name 'sensor1' is taken by device {first}"):
        reg.add_device(second, "sensor1")
    with pytest.raises(RegistryError, match="taken"):
        reg.add_device(new_id(), "sensor1")
    assert reg.device("sensor1")["id"] == first
    assert reg.device("sensor2")["id"] == second
    assert len(reg.devices()) == 2


def test_ids_and_names_wider_than_their_columns_are_refused(reg):
    with pytest.raises(RegistryError, match="device name"):
        reg.add_device(new_id(), "n" * 65)
    with pytest.raises(RegistryError, match="device id"):
        reg.add_device("i" * 33, "sensor1")
    with pytest.raises(RegistryError, match="device name"):
        reg.add_device(new_id(), "")
    assert reg.devices() == []


def test_online_describe_and_shapes(reg):
    device_id = new_id()
    reg.add_device(device_id, "sensor1")
    before = time.time()
    reg.set_online(device_id, True)
    device = reg.device("sensor1")
    assert device["online"] is True
    assert isinstance(device["last_seen"], float) and device["last_seen"] >= before - 1

    reg.set_describe(device_id, describe("1.2.3", "safe"))
    device = reg.device(device_id)
    assert set(device) == DEVICE_KEYS
    assert device["system_version"] == "1.2.3"  # system-part 1, not 2
    assert device["mode"] == "safe"
    assert device["platform"] == "virtual"  # from the describe
    assert device["describe"] == describe("1.2.3", "safe")

    seen = device["last_seen"]
    time.sleep(0.01)
    reg.seen(device_id)
    assert reg.device(device_id)["last_seen"] > seen

    reg.set_online(device_id, False)
    assert reg.device(device_id)["online"] is False

    reg.set_describe(device_id, {"platform": "virtual", "modules": []})
    device = reg.device(device_id)
    assert (device["system_version"], device["mode"]) == (None, None)


def test_only_a_describe_the_protocol_allows_is_stored(reg):
    device_id = new_id()
    reg.add_device(device_id, "sensor1")
    reg.set_describe(device_id, describe("1.2.3"))
    for bad in ([], None, "x", {"modules": "all"}, {"modules": [1]},
                {"modules": [{"function": "system-part", "index": "1"}]}):
        with pytest.raises(protocol.Invalid):
            reg.set_describe(device_id, bad)
    assert reg.device(device_id)["describe"] == describe("1.2.3")  # the last good one


# What older versions (or a hand) may have left in the describe column: each must leave
# the registry readable, with that device's describe unknown, and say why.
STORED_DESCRIBES = [
    ("not JSON", "{modules: ["),
    ("a list", "[1, 2, 3]"),
    ("null", "null"),
    ("a string", '"hello"'),
    ("modules not a list", '{"modules": "system-part 1"}'),
    ("a module not an object", '{"modules": [1, 2]}'),
    ("a module without its index", '{"modules": [{"function": "system-part", "version": "1.0.0"}]}'),
    ("a version not a string", '{"modules": [{"function": "system-part", "index": 1, "version": 5}]}'),
    ("missing not a list", '{"missing": {"function": "x"}}'),
    ("NaN", '{"heap_free": NaN}'),
    ("too deep", '{"vm": ' * 40 + "{}" + "}" * 40),
    ("too big", '{"board": "' + "x" * (protocol.MAX_DESCRIBE + 10) + '"}'),
]


@pytest.mark.parametrize("stored", [s for _, s in STORED_DESCRIBES],
                         ids=[name for name, _ in STORED_DESCRIBES])
def test_a_stored_describe_of_the_wrong_shape_is_unknown_not_fatal(reg, stored):
    good, bad = new_id(), new_id()
    reg.add_device(good, "good")
    reg.set_describe(good, describe("1.2.3"))
    reg.add_device(bad, "poisoned", "virtual")
    reg.query("UPDATE devices SET describe = ? WHERE id = ?", (stored, bad))  # as by hand

    listed = {d["name"]: d for d in reg.devices()}
    assert listed["good"]["system_version"] == "1.2.3" and listed["good"]["describe_error"] is None
    poisoned = reg.device("poisoned")
    assert poisoned == listed["poisoned"]
    assert (poisoned["describe"], poisoned["mode"], poisoned["system_version"]) == ({}, None, None)
    assert poisoned["describe_error"].startswith("describe")
    assert poisoned["platform"] == "virtual"  # its own column, unharmed
    reg.set_describe(bad, describe("1.0.0"))  # the device's next describe replaces it
    assert reg.device("poisoned")["describe_error"] is None


def test_dropped_messages_are_counted_per_device_and_kept(target):
    reg = Registry(target)
    a, b = new_id(), new_id()
    try:
        reg.add_device(a, "a")
        reg.add_device(b, "b")
        assert reg.drops(a) == {"count": 0, "reason": None, "ts": None}
        before = time.time()
        assert reg.count_drop(a, "describe: a JSON list, not an object") == 1
        assert reg.count_drop(a, "reply: not JSON\x00" + "x" * 500) == 2
        drops = reg.drops(a)
        assert drops["count"] == 2 and drops["ts"] >= before - 1
        assert drops["reason"].startswith("reply: not JSON") and len(drops["reason"]) <= 200
        assert reg.device("a")["last_seen"] >= before - 1  # it was heard from
        assert reg.drops(b)["count"] == 0
    finally:
        reg.close()
    reg = Registry(target)  # kept across a restart
    try:
        assert reg.drops(a)["count"] == 2
    finally:
        reg.close()


def test_devices_sorted_by_name_alike_in_both(reg):
    names = ["b", "B", "a_1", "a-2", "Z", "a"]
    for name in names:
        reg.add_device(new_id(), name)
    listed = reg.devices()
    assert [d["name"] for d in listed] == sorted(names)  # code point order, whatever the collation
    assert all(set(d) == DEVICE_KEYS for d in listed)


def test_device_by_name_comes_before_by_id(reg):
    first, second = new_id(), new_id()
    reg.add_device(first, "sensor1")
    reg.add_device(second, first)  # named like the other device's id
    assert reg.device(first)["id"] == second
    assert reg.device(second)["id"] == second
    assert reg.device("sensor1")["id"] == first


def test_platform_from_a_device_is_stored_alike(reg):
    device_id = new_id()
    reg.add_device(device_id, "sensor1")
    reg.set_describe(device_id, {"platform": "p" * 31 + "\x00", "modules": []})
    assert reg.device(device_id)["platform"] == "p" * 31 + "\ufffd"  # PostgreSQL has no NUL
    for refused in ({"platform": 7}, {"platform": "p" * 33}):  # the protocol's limits
        with pytest.raises(protocol.Invalid):
            reg.set_describe(device_id, refused)
    assert reg.device(device_id)["platform"] == "p" * 31 + "\ufffd"


# Events


def test_events_added_and_listed(reg):
    a, b = new_id(), new_id()
    reg.add_device(a, "alpha")
    reg.add_device(b, "beta")
    seqs = [
        reg.add_event(a, "temp", "21.5"),
        reg.add_event(b, "button", None),
        reg.add_event(a, "temp", "22.0"),
        reg.add_event(b, "button", "long"),
    ]
    assert all(isinstance(s, int) for s in seqs)
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert reg.last_event_seq() == seqs[-1]

    events = reg.events()
    assert [e["seq"] for e in events] == seqs
    assert all(set(e) == EVENT_KEYS for e in events)
    assert events[0]["device"] == "alpha" and events[0]["id"] == a
    assert (events[0]["name"], events[0]["data"]) == ("temp", "21.5")
    assert events[1]["data"] is None
    assert isinstance(events[0]["ts"], float)

    assert [e["seq"] for e in reg.events(after=seqs[1])] == seqs[2:]
    assert reg.events(after=seqs[-1]) == []
    assert [e["seq"] for e in reg.events(device_id=b)] == [seqs[1], seqs[3]]
    assert [e["seq"] for e in reg.events(after=seqs[1], device_id=b)] == [seqs[3]]
    assert [e["seq"] for e in reg.events(limit=2)] == seqs[:2]

    reg.add_device(a, "alpha2")  # events follow the device's current name
    assert {e["device"] for e in reg.events(device_id=a)} == {"alpha2"}


def test_an_event_sets_last_seen_with_it(reg):
    """add_event writes the device's last_seen in its own transaction (the service no
    longer commits a second time for it)."""
    a, b = new_id(), new_id()
    reg.add_device(a, "alpha")
    reg.add_device(b, "beta")
    seq = reg.add_event(a, "temp", "21.5")
    (event,) = reg.events(after=seq - 1)
    assert reg.device(a)["last_seen"] == event["ts"]
    assert reg.device(b)["last_seen"] is None


def test_sqlite_registry_syncs_normally_in_wal(tmp_path):
    registry = Registry(tmp_path / "registry.db")
    try:
        assert registry.query("PRAGMA journal_mode")[0][0] == "wal"
        assert registry.query("PRAGMA synchronous")[0][0] == 1  # NORMAL
    finally:
        registry.close()


def test_events_are_trimmed_per_device(reg, monkeypatch):
    monkeypatch.setattr(registry_module, "KEEP_EVENTS", 3)
    a, b = new_id(), new_id()
    reg.add_device(a, "alpha")
    reg.add_device(b, "beta")
    for i in range(6):  # interleaved: the other device's events take seqs in between
        reg.add_event(a, "a", str(i))
        if i < 2:
            reg.add_event(b, "b", str(i))
    assert [e["data"] for e in reg.events(device_id=a)] == ["3", "4", "5"]
    assert [e["data"] for e in reg.events(device_id=b)] == ["0", "1"]
    last = reg.add_event(b, "b", "2")
    reg.add_event(b, "b", "3")
    assert [e["data"] for e in reg.events(device_id=b)] == ["1", "2", "3"]
    assert [e["data"] for e in reg.events(device_id=a)] == ["3", "4", "5"]
    assert reg.last_event_seq() == last + 1


def test_event_text_is_stored_alike(reg):
    device_id = new_id()
    reg.add_device(device_id, "sensor1")
    reg.add_event(device_id, "n" * 70, "a\x00b")
    event = reg.events()[0]
    assert event["name"] == "n" * 64
    assert event["data"] == "a\ufffdb"


def test_events_from_many_threads(reg):
    device_ids = [new_id() for _ in range(4)]
    for i, device_id in enumerate(device_ids):
        reg.add_device(device_id, f"d{i}")
    seqs, errors = [], []

    def publish(device_id):
        try:
            for i in range(25):
                seqs.append(reg.add_event(device_id, "tick", str(i)))
                reg.seen(device_id)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(d,)) for d in device_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(set(seqs)) == 100
    assert len(reg.events(limit=1000)) == 100
    assert reg.last_event_seq() == max(seqs)


def test_a_batch_of_device_messages_is_one_transaction_in_order(reg):
    """Registry.write_batch, the fleet service's ingest: each write in order, a device the
    registry does not know skipped, a rollback recorded once, drops counted, events
    numbered, last_seen the commit's time."""
    a, b = new_id(), new_id()
    reg.add_device(a, "a")
    reg.add_device(b, "b")
    stranger = new_id()
    rollback = {"function": "system-part", "index": 2, "version": "1.1.0", "sha256": None,
                "restored": "1.0.0", "reason": "no-cloud"}
    writes = [
        Write("status", a, True, 100.0),
        Write("describe", a, (describe("1.0.0"), None), 101.0),
        Write("describe", a, (describe("1.1.0"), rollback), 102.0),
        Write("describe", a, (describe("1.1.0"), rollback), 103.0),  # said again: not new
        Write("event", b, ("temp", "21"), 104.0),
        Write("event", stranger, ("temp", "99"), 104.5),
        Write("drop", b, "bad json", 105.0),
        Write("drop", b, "too long", 106.0),
        Write("status", b, True, 107.0),
        Write("status", b, False, 108.0),
        Write("seen", a, None, 109.0),
        Write("event", b, ("temp", "22"), 99.0),
    ]
    before = time.time()
    results = reg.write_batch(writes)
    assert results[0] is True
    assert results[1] is False and results[2]["version"] == "1.1.0" and results[3] is False
    assert results[4]["device"] == "b" and results[4]["data"] == "21"
    assert results[5] is None
    assert results[6:8] == [1, 2]
    assert results[11]["seq"] > results[4]["seq"]
    dev_a, dev_b = reg.device("a"), reg.device("b")
    assert (dev_a["online"], dev_a["system_version"]) == (True, "1.1.0")
    assert dev_b["online"] is False
    assert before <= dev_a["last_seen"] == dev_b["last_seen"] <= time.time()  # the commit's
    assert len(reg.rollbacks(a)) == 1
    assert reg.drops(b)["count"] == 2 and reg.drops(b)["reason"] == "too long"
    assert [e["data"] for e in reg.events(0, b)] == ["21", "22"]
    assert not reg.events(0, stranger)


def test_data_kept_after_close_and_reopen(target):
    device_id = new_id()
    reg = Registry(target)
    reg.add_device(device_id, "sensor1", "virtual")
    reg.set_describe(device_id, describe("1.1.0"))
    reg.set_online(device_id, True)
    first = reg.add_event(device_id, "temp", "20")
    reg.close()

    reg = Registry(target)  # the schema is there already: kept as it is
    try:
        device = reg.device("sensor1")
        assert (device["id"], device["online"], device["system_version"]) == (device_id, True, "1.1.0")
        assert [(e["seq"], e["data"]) for e in reg.events()] == [(first, "20")]
        assert reg.last_event_seq() == first
        assert reg.add_event(device_id, "temp", "21") > first
    finally:
        reg.close()


# Fleets and rollbacks


def test_fleets_created_listed_and_refused(reg):
    assert reg.fleets() == [] and reg.fleet("sensors") is None
    reg.create_fleet("sensors", "virtual")
    reg.create_fleet("boards", "esp32")
    assert [(f["name"], f["platform"], f["members"]) for f in reg.fleets()] == [
        ("boards", "esp32", 0), ("sensors", "virtual", 0)]
    assert isinstance(reg.fleet("sensors")["created"], float)
    with pytest.raises(RegistryError, match=r"fleet 'sensors' exists already \(platform virtual\)"):
        reg.create_fleet("sensors", "esp32")
    for bad in ("", "-x", "a b", "n" * 65, "a/b"):
        with pytest.raises(RegistryError, match="invalid fleet name"):
            reg.create_fleet(bad, "virtual")
    with pytest.raises(RegistryError, match="no fleet 'nope' \\(fleets: boards, sensors\\)"):
        reg.require_fleet("nope")


def test_devices_join_one_fleet_of_their_platform(reg):
    a, b, c, blank = new_id(), new_id(), new_id(), new_id()
    reg.add_device(a, "a", "virtual")
    reg.add_device(b, "b", "virtual")
    reg.add_device(c, "c", "esp32")
    reg.add_device(blank, "blank")  # platform not known yet: may join
    reg.create_fleet("sensors", "virtual")
    reg.create_fleet("other", "virtual")

    assert reg.add_to_fleet("sensors", ["a", b, "blank"]) == {"added": ["a", "b", "blank"], "already": []}
    assert reg.add_to_fleet("sensors", ["a"]) == {"added": [], "already": ["a"]}
    assert reg.device("a")["fleet"] == "sensors" and reg.device(c)["fleet"] is None
    assert {d["name"]: d["fleet"] for d in reg.devices()} == {
        "a": "sensors", "b": "sensors", "blank": "sensors", "c": None}
    assert [d["name"] for d in reg.fleet_devices("sensors")] == ["a", "b", "blank"]
    assert reg.fleet("sensors")["members"] == 3
    assert reg.memberships() == {a: "sensors", b: "sensors", blank: "sensors"}

    # All or nothing: one bad device and none is added.
    with pytest.raises(RegistryError, match="device 'c' is esp32, fleet 'other' is virtual"):
        reg.add_to_fleet("other", ["c"])
    with pytest.raises(RegistryError, match="device 'a' is in fleet 'sensors': keel fleet remove sensors a first"):
        reg.add_to_fleet("other", ["a"])
    with pytest.raises(RegistryError, match="no device 'ghost'"):
        reg.add_to_fleet("sensors", ["c", "ghost"])
    with pytest.raises(RegistryError, match="no fleet 'nope'"):
        reg.add_to_fleet("nope", ["a"])
    assert reg.device("c")["fleet"] is None and reg.fleet("other")["members"] == 0

    with pytest.raises(RegistryError, match="device 'c' is not in fleet 'sensors' \\(in no fleet\\)"):
        reg.remove_from_fleet("sensors", ["a", "c"])
    assert reg.device("a")["fleet"] == "sensors"
    assert reg.remove_from_fleet("sensors", ["a", b]) == ["a", "b"]
    assert reg.memberships() == {blank: "sensors"}
    assert reg.add_to_fleet("other", ["a"])["added"] == ["a"]


def test_rollbacks_recorded_once(reg):
    device_id = new_id()
    reg.add_device(device_id, "d", "virtual")
    rollback = {"function": "system-part", "index": 2, "version": "1.1.0", "restored": "1.0.0",
                "reason": "no-cloud", "sha256": None}
    assert reg.add_rollback(device_id, rollback) is True
    assert reg.add_rollback(device_id, rollback) is False  # reported on every describe
    assert reg.add_rollback(device_id, rollback | {"sha256": "ab" * 32}) is True
    listed = reg.rollbacks(device_id)
    assert [(r["function"], r["index"], r["version"], r["sha256"], r["restored"], r["reason"])
            for r in listed] == [("system-part", 2, "1.1.0", None, "1.0.0", "no-cloud"),
                                 ("system-part", 2, "1.1.0", "ab" * 32, "1.0.0", "no-cloud")]
    assert reg.rollbacks(new_id()) == []


def test_app_releases_alike_in_both(reg, tmp_path):
    import hashlib

    from keel import module_format as mf
    from keel_cloud.fleet_releases import AppImage, Fleets

    class NoSystems:  # apps without dependencies need no system release
        def releases(self, platform=None):
            return []

        def image(self, *key):
            return None

    def image(version):
        info = mf.ModuleInfo(mf.FUNCTION_USER_PART, 1, mf.encode_version(version), mf.platform_id("virtual"))
        data = mf.build_image(info, version.encode() * 8, hashlib.sha256)
        return AppImage(version=version, index=1, platform="virtual", dependencies=[], data=data)

    device_id = new_id()
    reg.add_device(device_id, "d", "virtual")
    reg.create_fleet("f", "virtual")
    reg.add_to_fleet("f", ["d"])
    fleets = Fleets(reg, tmp_path)
    assert fleets.target(device_id) is None and fleets.currents() == {}
    first = fleets.release("f", image("1.0.0"), False, NoSystems())
    assert (first["number"], first["version"], first["already"]) == (1, "1.0.0", False)
    assert first["sha256"] == image("1.0.0").sha256 and first["digest"] == image("1.0.0").digest
    assert fleets.release("f", image("1.0.0"), False, NoSystems())["already"] is True
    second = fleets.release("f", image("2.0.0"), True, NoSystems())
    assert (second["number"], second["allow_prerelease"]) == (2, True)
    current = {k: v for k, v in second.items() if k != "already"}
    assert fleets.target(device_id) == fleets.current("f") == current
    assert [r["number"] for r in fleets.history("f")] == [2, 1]
    assert fleets.currents() == {"f": 2}
    assert fleets.app_image(second) == image("2.0.0").data
    reg.remove_from_fleet("f", ["d"])
    assert fleets.target(device_id) is None


# PostgreSQL only


def test_bad_or_unreachable_postgresql_urls(tmp_path):
    port = free_port()
    cases = [
        (f"postgresql://keel:hunter2@127.0.0.1:{port}/keel", "cannot connect to the PostgreSQL registry"),
        (f"postgres://127.0.0.1:{port}/keel?password=hunter2", "cannot connect to the PostgreSQL registry"),
        ("postgresql://keel:hunter2@[::1/keel", "invalid database URL"),
        ("postgresql://127.0.0.1/keel?nosuchoption=1", "invalid database URL"),
        ("mysql://keel:hunter2@127.0.0.1/keel", "unsupported database"),
    ]
    for url, expected in cases:
        with pytest.raises(RegistryError) as raised:
            Registry(url)
        message = str(raised.value)
        assert expected in message, message
        assert "\n" not in message and "hunter2" not in message, message


def test_unknown_postgresql_database(postgres_url):
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(RegistryError, match='database "no_such_database" does not exist'):
        Registry(url)


def test_reconnects_after_the_server_drops_the_connection(postgres_url):
    pg_rows(postgres_url, f"DROP TABLE IF EXISTS {TABLES}")
    reg = Registry(postgres_url)
    try:
        device_id = new_id()
        reg.add_device(device_id, "sensor1")
        pg_rows(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(RegistryError, match="failed"):
            reg.devices()
        assert reg.device("sensor1")["id"] == device_id  # a new connection
    finally:
        reg.close()


def test_the_cloud_uses_postgresql_when_cloud_json_says(postgres_url, tmp_path):
    from keel_cloud.client import ApiClient
    from keel_cloud.config import CloudDir
    from keel_cloud.provision import identity_files
    from keel_cloud.serve import Cloud

    pg_rows(postgres_url, f"DROP TABLE IF EXISTS {TABLES}")
    cloud_dir = CloudDir(tmp_path / "cloud")
    config = cloud_dir.init(mqtt=f"127.0.0.1:{free_port()}", http=f"127.0.0.1:{free_port()}")
    config.database = postgres_url
    cloud_dir.save_config(config)
    assert cloud_dir.config().database == postgres_url

    device_id = new_id()
    files = identity_files(cloud_dir, device_id, "pgdevice", "virtual")
    assert "/keel/cloud/cert.der" in files
    assert pg_rows(postgres_url, "SELECT id, name, platform, online FROM devices") == [
        (device_id, "pgdevice", "virtual", 0)]
    assert not cloud_dir.registry_path.exists()  # no SQLite registry beside it

    cloud = Cloud(cloud_dir)  # what `keel cloud serve` runs
    cloud.start()
    try:
        listed = ApiClient(cloud_dir).devices()
        assert [(d["name"], d["id"], d["online"]) for d in listed] == [("pgdevice", device_id, False)]
    finally:
        cloud.stop()
    assert not cloud_dir.registry_path.exists()
