"""bootloader/ed25519.py on the MicroPython VM, in a small heap: verdicts on a batch of
signatures made on the host with `cryptography` (valid and corrupted), and the pure SHA-512
the VM falls back to, against CPython's hashlib.

`python tests/device/test_ed25519_vm.py` prints the measurements quoted in
docs/module-format.md (verify time and heap, SHA-256 of 40 KB); the tests assert none.
"""

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keel.paths import micropython, mpy_cross

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "bootloader" / "ed25519.py"
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493

# Reads "expected public message signature" lines (hex, "-" for empty) and prints one
# "index verdict" line each; the vectors stay in a file, not in the VM's heap.
VERIFY_SCRIPT = """\
import sys
sys.path.insert(0, %(path)r)
import ed25519
from binascii import unhexlify

def field(text):
    return b"" if text == "-" else unhexlify(text)

n = 0
with open(%(vectors)r) as f:
    for line in f:
        expected, public, message, signature = line.split()
        verdict = ed25519.verify(field(public), field(message), field(signature))
        print(n, "1" if verdict is True else ("0" if verdict is False else repr(verdict)))
        n += 1
print("DONE", n)
"""

SHA_SCRIPT = """\
import sys
sys.path.insert(0, %(path)r)
import ed25519
from binascii import hexlify

for n in %(lengths)r:
    data = bytes((i * 131 + n) & 0xFF for i in range(n))
    h = ed25519._Sha512(data[: n // 3])
    h.update(data[n // 3 :])
    print(n, hexlify(ed25519._Sha512(data).digest()).decode(), hexlify(h.digest()).decode())
"""

SHA_LENGTHS = [0, 1, 3, 55, 63, 64, 100, 110, 111, 112, 113, 127, 128, 129, 200, 239, 240, 241,
               255, 256, 257, 1000]


def run_vm(script: Path, heap: str) -> str:
    proc = subprocess.run([micropython(), "-X", f"heapsize={heap}", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module", params=["mpy", "source"])
def module_dir(request, tmp_path_factory):
    """Where the VM imports ed25519 from, and the heap it gets: the .mpy the bootloader
    would carry (32 KB of heap), or the .py compiled on the VM (64 KB: the compiler needs
    room)."""
    out = tmp_path_factory.mktemp("ed25519-" + request.param)
    if request.param == "mpy":
        subprocess.run([mpy_cross(), "-o", str(out / "ed25519.mpy"), "-s", "ed25519.py",
                        str(SOURCE)], check=True, capture_output=True)
        return out, "32K"
    (out / "ed25519.py").write_bytes(SOURCE.read_bytes())
    return out, "64K"


def raw_public(key):
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def make_vectors(count=12):
    """(expected, public, message, signature) from cryptography, valid and corrupted."""
    vectors = []
    for i in range(count):
        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"seed %d" % i).digest())
        public = raw_public(key)
        message = (b"KEELSIG1" + hashlib.sha256(b"module %d" % i).digest() if i % 2
                   else bytes(range(256))[: [0, 1, 111, 112, 127, 128, 200][i % 7]])
        signature = key.sign(message)
        s = int.from_bytes(signature[32:], "little")
        vectors += [
            (True, public, message, signature),
            (False, public, message, flip(signature, (37 * i) % 512)),
            (False, public, message, flip(signature, 256 + i)),  # S
            (False, public, message + b"\0", signature),
            (False, flip(public, (53 * i) % 256), message, signature),
            (False, public, message, signature[:32] + (s + L).to_bytes(32, "little")),
        ]
        if message:
            vectors.append((False, public, flip(message, (11 * i) % (8 * len(message))),
                            signature))
    vectors += [
        (False, bytes(32), bytes(200), bytes(64)),  # small-order key; OpenSSL accepts it
        (False, (P + 1).to_bytes(32, "little"), b"m", bytes(64)),  # y >= p
        (False, (1 | 1 << 255).to_bytes(32, "little"), b"m", bytes(64)),  # x = 0, sign 1
        (False, b"", b"", b""),
        (False, public[:31], message, signature),
        (False, public, message, signature[:63]),
        (False, public, message, signature + b"\0"),
        (False, b"\xff" * 32, b"\xff" * 10, b"\xff" * 64),
    ]
    return vectors


def write_vectors(path: Path, vectors):
    with path.open("w") as f:
        for expected, public, message, signature in vectors:
            f.write(" ".join([str(int(expected))] +
                             [part.hex() or "-" for part in (public, message, signature)]) + "\n")


def openssl_verdict(public, message, signature):
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_the_vectors_expectations_agree_with_openssl():
    for expected, public, message, signature in make_vectors():
        if public != bytes(32):  # the small-order key, which OpenSSL accepts
            assert openssl_verdict(public, message, signature) == expected


def test_verdicts_on_the_vm(module_dir, tmp_path):
    path, heap = module_dir
    vectors = make_vectors()
    assert sum(v[0] for v in vectors) == 12 and len(vectors) > 80
    write_vectors(tmp_path / "vectors.txt", vectors)
    script = tmp_path / "verify.py"
    script.write_text(VERIFY_SCRIPT % {"path": str(path), "vectors": str(tmp_path / "vectors.txt")})
    lines = run_vm(script, heap).splitlines()
    assert lines[-1] == "DONE %d" % len(vectors)
    verdicts = dict(line.split() for line in lines[:-1])
    for n, (expected, public, message, signature) in enumerate(vectors):
        assert verdicts[str(n)] == str(int(expected)), (n, public.hex(), message.hex(),
                                                        signature.hex())


def test_pure_sha512_on_the_vm(module_dir, tmp_path):
    path, heap = module_dir
    script = tmp_path / "sha.py"
    script.write_text(SHA_SCRIPT % {"path": str(path), "lengths": SHA_LENGTHS})
    lines = run_vm(script, heap).splitlines()
    assert len(lines) == len(SHA_LENGTHS)
    for n, line in zip(SHA_LENGTHS, lines):
        data = bytes((i * 131 + n) & 0xFF for i in range(n))
        want = hashlib.sha512(data).hexdigest()
        assert line.split() == [str(n), want, want], n


# --- measurements (not tests): python tests/device/test_ed25519_vm.py ---

MEASURE_SCRIPT = """\
import sys, gc, time
sys.path.insert(0, %(path)r)
import ed25519
import hashlib
public, message, signature = %(vector)r
print("sha512", "hashlib" if ed25519._sha512 is not ed25519._Sha512 else "pure")
times = []
for _ in range(%(runs)d):
    t = time.ticks_us()
    assert ed25519.verify(public, message, signature)
    times.append(time.ticks_diff(time.ticks_us(), t))
times.sort()
print("verify_us min %%d median %%d" %% (times[0], times[len(times) // 2]))
gc.collect()
before = gc.mem_alloc()
if %(churn)s:  # with the collector off, the heap must hold all a verify allocates
    gc.disable()
    ed25519.verify(public, message, signature)
    print("allocated_per_verify", gc.mem_alloc() - before)
    gc.enable()
    gc.collect()
    print("retained_after_verify", gc.mem_alloc() - before)
if %(churn)s:  # a contiguous 40 KB does not always fit in the small heap
    buf, chunk = bytearray(40 * 1024), bytearray(512)
    for label, chunks in (("sha256_40k_us", ((buf,))), ("sha256_80x512_us", (chunk,) * 80)):
        times = []
        for _ in range(20):
            t = time.ticks_us()
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            h.digest()
            times.append(time.ticks_diff(time.ticks_us(), t))
        times.sort()
        print("%%s min %%d median %%d" %% (label, times[0], times[len(times) // 2]))
"""

HEAP_SCRIPT = """\
import sys
sys.path.insert(0, %(path)r)
import ed25519
public, message, signature = %(vector)r
%(action)s
print("OK")
"""


def smallest_heap(path, vector, action, tmp):
    """The smallest -X heapsize (1 KB steps) in which the script still prints OK."""
    script = tmp / "heap.py"
    script.write_text(HEAP_SCRIPT % {"path": str(path), "vector": vector, "action": action})
    for kb in range(8, 129):
        proc = subprocess.run([micropython(), "-X", "heapsize=%dK" % kb, str(script)],
                              capture_output=True, text=True, timeout=60)
        if proc.stdout.strip() == "OK":
            return kb
    return None


def measure():
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    subprocess.run([mpy_cross(), "-o", str(tmp / "ed25519.mpy"), str(SOURCE)], check=True)
    key = Ed25519PrivateKey.generate()
    message = b"KEELSIG1" + hashlib.sha256(b"a 40 KB module").digest()
    vector = (raw_public(key), message, key.sign(message))
    script = tmp / "measure.py"
    for heap, churn in (("64K", False), ("8M", True)):
        script.write_text(MEASURE_SCRIPT % {"path": str(tmp), "vector": vector, "runs": 50,
                                            "churn": churn})
        print("heap %s:" % heap, run_vm(script, heap).replace("\n", "; "))
    import_kb = smallest_heap(tmp, vector, "", tmp)
    verify_kb = smallest_heap(tmp, vector, "assert ed25519.verify(public, message, signature)",
                              tmp)
    print("smallest heap: import %s KB, import + verify %s KB" % (import_kb, verify_kb))


if __name__ == "__main__":
    measure()
