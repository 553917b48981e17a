# A small persistent key-value store for apps, kept on the filesystem outside the
# module code, so it survives resets and module updates. Every change is written
# to a new file renamed over the old one: a power cut keeps the old or the new.
import json
import flashfs
from keel_files import DATA_DIR, STORE_FILE

MAX_BYTES = 4096
MAX_KEY = 32

_cache = [None]


def _data():
    if _cache[0] is None:
        _cache[0] = flashfs.read_json(STORE_FILE, {})
    return _cache[0]


def _save(data):
    text = json.dumps(data)
    try:
        # What is stored is what reads back: refuse what JSON cannot hold (objects,
        # nan) instead of writing a file the next boot cannot parse.
        stored = json.loads(text)
    except ValueError:
        raise ValueError("store values must be JSON: numbers, strings, lists, dicts, None")
    size = len(text.encode())
    if size > MAX_BYTES:
        raise ValueError("store full: %d bytes, the limit is %d" % (size, MAX_BYTES))
    flashfs.makedirs(DATA_DIR)
    flashfs.write_atomic(STORE_FILE, text)
    _cache[0] = stored


def get(key, default=None):
    value = _data().get(key, default)
    if isinstance(value, (list, dict)):  # a copy: changing it must not change the store
        value = json.loads(json.dumps(value))
    return value


def set(key, value):
    """Store a JSON-serialisable value under key (a string of up to 32 characters)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
        raise ValueError("store keys are strings of 1 to %d characters" % MAX_KEY)
    data = dict(_data())
    data[key] = value
    _save(data)


def delete(key):
    if key in _data():
        data = dict(_data())
        del data[key]
        _save(data)


def keys():
    return list(_data().keys())


def clear():
    _save({})
