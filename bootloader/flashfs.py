# Small helpers for state kept on the board's filesystem. Every write goes to a
# temporary file that is renamed over the old one, so a power cut leaves either
# the old or the new content (LittleFS renames are atomic).
import os
import json


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def is_dir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def makedirs(path):
    built = ""
    for part in path.split("/"):
        if not part:
            continue
        built += "/" + part
        if not exists(built):
            os.mkdir(built)


def remove_tree(path):
    """Remove a file or a directory with everything in it. Iterative, holding only the
    path it is in: a tree of any depth (an interrupted install of hostile input) goes
    without deep recursion. Goes down to the first subdirectory it finds, back up to
    the parent once a directory is empty."""
    if not exists(path):
        return
    if not is_dir(path):
        os.remove(path)
        return
    here = path
    while True:
        below = None
        for name in os.listdir(here):
            child = here + "/" + name
            if is_dir(child):
                below = child
                break
            os.remove(child)
        if below is not None:
            here = below
            continue
        os.rmdir(here)
        if here == path:
            return
        here = here[: here.rfind("/")]


def write_atomic(path, data):
    """Write data (text, bytes, or a function that writes the text to the file it is
    given) to path.tmp, then rename it over path."""
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
    os.rename(tmp, path)


def read_text(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def read_json(path, default=None):
    # Parsed from the file, and written to it as it is made: no copy of the whole
    # document's text on the heap (a status is 1.5 KB, a board 2 KB: on a board with
    # about 110 KB of heap, the difference between a boot that records it and one that
    # runs out).
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)
