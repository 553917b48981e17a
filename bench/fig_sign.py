"""Figure 7, signatures: what checking a signed 40 KB module costs a board that trusts a
key, on the MicroPython VM with the virtual board's heap.

Keel: what the bootloader does before it installs a signed module on such a board
(module_check.accept): the image's SHA-256 and CRC32 streamed through a 512-byte buffer
(mf.check_image), then module_check.signature_problem (the board's keys read, the Ed25519
verifier imported from the bootloader's compiled code, the signature over the digest
verified, the verifier dropped again). Baseline: the same module unsigned on a board in
development mode: the SHA-256 and CRC32 check, then signature_problem, which returns at
once. Both run from the bootloader's own .mpy files (extracted from a built bootloader
module), reading the image from a file. A second row times one verify alone, warm (the
verifier already imported), and a third the smallest heap the whole signed check runs in
(the VM started with smaller and smaller -X heapsize until it fails, 1 KB apart). Runs alternate
Keel and baseline, each in a fresh VM (so each check imports the verifier cold, as an
install does)."""

import random
import subprocess

from bench.common import KB, Goal, board_heap, median, micropython, row

FIGURE = 7
TITLE = "Signature check of a 40 KB module on the device"

SCRIPT = """\
import sys, gc, time, hashlib
sys.path.insert(0, {bl!r})
import module_format as mf
import module_check
f = open({image!r}, 'rb')
def read(offset, buf):
    f.seek(offset)
    return f.readinto(buf)
size = {size}
keys = [bytes.fromhex(k) for k in {keys!r}]
buf = bytearray(512)
gc.collect()
t0 = time.ticks_us()
info, crc_ok, sha_ok = mf.check_image(read, size, hashlib.sha256, buf)
t1 = time.ticks_us()
problem = module_check.signature_problem(read, info, keys)
t2 = time.ticks_us()
assert crc_ok and sha_ok and problem is None, (crc_ok, sha_ok, problem)
warm = -1
if keys:
    import trust, ed25519
    block = mf.signature_block(read, info, bytearray(mf.SIGNATURE_SIZE))
    digest = mf.stored_sha256(read, info, bytearray(32))
    t3 = time.ticks_us()
    ok = ed25519.verify(keys[0], trust.SIGNED_PREFIX + digest, block[1])
    warm = time.ticks_diff(time.ticks_us(), t3)
    assert ok
print('RESULT', time.ticks_diff(t1, t0), time.ticks_diff(t2, t1), warm)
"""


def _image(ctx, size: int, sign) -> bytes:
    """A user part of about size bytes (an app with an unimported blob), signed or not."""
    rnd = random.Random(7)
    blob = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size))
    src = ctx.work / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "main.py").write_text("def setup():\n    pass\n")
    (src / "blob.py").write_text(f'DATA = "{blob}"\n')
    from keel import build

    name = "signed" if sign else "unsigned"
    return build.build_app(src, "virtual", "1.1.0", ctx.work / f"{name}.bin", sign=sign).read_bytes()


def _bootloader_code(ctx):
    from keel import factory, keel_files
    from keel.images import load_valid_image

    boot = load_valid_image(next(ctx.system().glob("*bootloader*")))
    out = ctx.work / "bl"
    for path, data in factory.bootloader_files(boot).items():
        target = out / path[len(keel_files.BOOTLOADER_DIR) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return out


def _measure(ctx, bl, image_path, size, keys, heap):
    script = ctx.work / "check.py"
    script.write_text(SCRIPT.format(bl=str(bl), image=str(image_path), size=size, keys=keys))
    proc = subprocess.run([micropython(), "-X", f"heapsize={heap}", str(script)],
                          capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"the check failed on the VM: {(proc.stdout + proc.stderr)[-500:]}")
    sha_us, sig_us, warm_us = (int(x) for x in line[0].split()[1:])
    return sha_us / 1000, sig_us / 1000, warm_us / 1000


def _fits(ctx, bl, path, size, keys, heap) -> bool:
    try:
        _measure(ctx, bl, path, size, keys, heap)
        return True
    except RuntimeError:
        return False


def smallest_heap(ctx, bl, path, size, keys, high) -> int:
    """The smallest -X heapsize (to 1 KB) in which the check runs."""
    low = 8 * KB
    while high - low > KB:
        mid = (low + high) // 2 // KB * KB
        if _fits(ctx, bl, path, size, keys, mid):
            high = mid
        else:
            low = mid
    return high


def run(ctx):
    from keel import signing

    runs = ctx.runs(11)
    size = 4 * KB if ctx.smoke else 40 * KB
    heap = board_heap()
    key_path = ctx.work / "key"
    signing.generate_key(key_path)
    key = signing.load_private_key(key_path)
    raw = signing.load_public_key(signing.public_path(key_path))
    signed = _image(ctx, size, signing.signer(key))
    unsigned = _image(ctx, size, None)
    paths = {}
    for name, data in (("signed", signed), ("unsigned", unsigned)):
        paths[name] = ctx.work / f"{name}.img"
        paths[name].write_bytes(data)
    bl = _bootloader_code(ctx)
    keel, base, warm, sig_part = [], [], [], []
    for _ in range(runs):
        sha, sig, w = _measure(ctx, bl, paths["signed"], len(signed), [raw.hex()], heap)
        keel.append(round(sha + sig, 2))
        sig_part.append(round(sig, 2))
        warm.append(round(w, 2))
        sha, sig, _ = _measure(ctx, bl, paths["unsigned"], len(unsigned), [], heap)
        base.append(round(sha + sig, 2))
    fits = (heap if ctx.smoke else
            smallest_heap(ctx, bl, paths["signed"], len(signed), [raw.hex()], heap))
    ctx.log(f"signed {median(keel):.1f} ms (signature {median(sig_part):.1f} ms), unsigned "
            f"{median(base):.1f} ms over {runs} runs")
    notes = (f"median of {runs} interleaved runs, a fresh VM each (heap {heap // KB} KB); a "
             f"{len(signed) // KB} KB user part read from a file through a 512-byte buffer; Keel: "
             "check_image with SHA-256, then module_check.signature_problem with the board's key "
             f"(the signature alone: {median(sig_part):.1f} ms, importing the verifier cold); "
             "baseline: the same unsigned module on a development-mode board")
    limits = ("the verifier is pure Python on MicroPython's big integers: ~3,850 multiplications "
              "mod 2^255-19 per verify, plus importing its bytecode; a real board (16-bit mpz "
              "digits, 64-240 MHz) is expected to take much longer: not measured here (no board)")
    rows = [
        row(FIGURE, "install check, signed 40 KB module", median(keel), median(base), "ms",
            Goal.at_most(250, "≤ 250 ms on the VM"), runs={"keel": keel, "baseline": base},
            limits=limits, notes=notes),
        row(FIGURE, "one Ed25519 verify, warm", median(warm), None, "ms",
            runs={"keel": warm, "baseline": []},
            notes="the verifier already imported: ed25519.verify over KEELSIG1 + the digest"),
        row(FIGURE, "smallest heap the signed check runs in", fits / KB, None, "KB",
            runs={"keel": [fits / KB], "baseline": []},
            notes="the smallest -X heapsize, found by bisection to 1 KB, in which it passes; it holds "
                  "module_format and module_check (loaded by the bootloader anyway) and, "
                  "during the check, the verifier's bytecode and its big-integer temporaries"
                  + (" (smoke run: not searched, the board's heap)" if ctx.smoke else "")),
    ]
    return rows
