# Ed25519 signature verification (RFC 8032, pure Ed25519) for the bootloader: one file for
# the MicroPython VM and CPython. Spec and measurements: docs/module-format.md.
#
# Port facts, read in MicroPython v1.28.0: ports/esp32/mpconfigport.h and
# ports/nrf/mpconfigport.h set MICROPY_LONGINT_IMPL_MPZ, so ints are arbitrary-precision.
# 3-argument pow() needs MICROPY_PY_BUILTINS_POW3, on by default only from ROM level
# EXTRA_FEATURES (py/mpconfig.h): esp32 and nrf52840 have it, nrf52832 (BASIC) and nrf51 do
# not, and any board may change it; so this file never uses it (_pow2_250 does its powers).
# extmod/modhashlib.c has no sha512 on any port: _Sha512 below stands in for it.
import struct

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_P = const(2**255 - 19)
_L = const(2**252 + 27742317777372353535851937790883648493)  # order of B
_D = const(0x52036CEE2B6FFE738CC740797779E89800700A4D4141D8AB75EB4DCA135978A3)  # -121665/121666
_D2 = const(0x2406D9DC56DFFCE7198E80F2EEF3D13000E0149A8283B156EBD69B9426B2F159)  # 2d
_SQRT_M1 = const(0x2B8324804FC1DF0B2B4D00993DFBD7A72F431806AD2FE478C4EE1B274A0EA0B0)
_BX = const(0x216936D3CD6E53FEC0A4E231FDD6DC5C692CC7609525A7B2C9562D608F25D51A)
_BY = const(0x6666666666666666666666666666666666666666666666666666666666666658)  # 4/5
_M64 = const(0xFFFFFFFFFFFFFFFF)


# --- SHA-512 (FIPS 180-4). _H0 and _K: the first 64 bits of the fractional parts of the
# square roots of the first 8 primes and of the cube roots of the first 80 primes ---
_H0 = (
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
)  # fmt: skip
_K = (
    0x428A2F98D728AE22, 0x7137449123EF65CD, 0xB5C0FBCFEC4D3B2F, 0xE9B5DBA58189DBBC,
    0x3956C25BF348B538, 0x59F111F1B605D019, 0x923F82A4AF194F9B, 0xAB1C5ED5DA6D8118,
    0xD807AA98A3030242, 0x12835B0145706FBE, 0x243185BE4EE4B28C, 0x550C7DC3D5FFB4E2,
    0x72BE5D74F27B896F, 0x80DEB1FE3B1696B1, 0x9BDC06A725C71235, 0xC19BF174CF692694,
    0xE49B69C19EF14AD2, 0xEFBE4786384F25E3, 0x0FC19DC68B8CD5B5, 0x240CA1CC77AC9C65,
    0x2DE92C6F592B0275, 0x4A7484AA6EA6E483, 0x5CB0A9DCBD41FBD4, 0x76F988DA831153B5,
    0x983E5152EE66DFAB, 0xA831C66D2DB43210, 0xB00327C898FB213F, 0xBF597FC7BEEF0EE4,
    0xC6E00BF33DA88FC2, 0xD5A79147930AA725, 0x06CA6351E003826F, 0x142929670A0E6E70,
    0x27B70A8546D22FFC, 0x2E1B21385C26C926, 0x4D2C6DFC5AC42AED, 0x53380D139D95B3DF,
    0x650A73548BAF63DE, 0x766A0ABB3C77B2A8, 0x81C2C92E47EDAEE6, 0x92722C851482353B,
    0xA2BFE8A14CF10364, 0xA81A664BBC423001, 0xC24B8B70D0F89791, 0xC76C51A30654BE30,
    0xD192E819D6EF5218, 0xD69906245565A910, 0xF40E35855771202A, 0x106AA07032BBD1B8,
    0x19A4C116B8D2D0C8, 0x1E376C085141AB53, 0x2748774CDF8EEB99, 0x34B0BCB5E19B48A8,
    0x391C0CB3C5C95A63, 0x4ED8AA4AE3418ACB, 0x5B9CCA4F7763E373, 0x682E6FF3D6B2B8A3,
    0x748F82EE5DEFB2FC, 0x78A5636F43172F60, 0x84C87814A1F0AB72, 0x8CC702081A6439EC,
    0x90BEFFFA23631E28, 0xA4506CEBDE82BDE9, 0xBEF9A3F7B2C67915, 0xC67178F2E372532B,
    0xCA273ECEEA26619C, 0xD186B8C721C0C207, 0xEADA7DD6CDE0EB1E, 0xF57D4F7FEE6ED178,
    0x06F067AA72176FBA, 0x0A637DC5A2C898A6, 0x113F9804BEF90DAE, 0x1B710B35131C471B,
    0x28DB77F523047D84, 0x32CAAB7B40C72493, 0x3C9EBE0A15C9BEBC, 0x431D67C49C100D4C,
    0x4CC5D4BECB3E42B6, 0x597F299CFC657E2A, 0x5FCB6FAB3AD6FAEC, 0x6C44198C4A475817,
)  # fmt: skip


def _rotr(x, n):
    return (x >> n | x << (64 - n)) & _M64


def _compress(h, data, off):
    # One 128-byte block into the state h. The schedule lives in a 16-word ring: w[t & 15]
    # holds W[t], so a block costs one 16-entry list instead of 80.
    w = list(struct.unpack_from(">16Q", data, off))
    a, b, c, d, e, f, g, hh = h
    for t in range(80):
        if t >= 16:
            x, y = w[(t - 15) & 15], w[(t - 2) & 15]
            x = (_rotr(x, 1) ^ _rotr(x, 8) ^ x >> 7) + (_rotr(y, 19) ^ _rotr(y, 61) ^ y >> 6)
            w[t & 15] = (w[t & 15] + w[(t - 7) & 15] + x) & _M64
        t1 = hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + (g ^ e & (f ^ g)) + _K[t]
        t1 += w[t & 15]
        t2 = (_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + (a & b | c & (a | b))
        hh, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M64, c, b, a, (t1 + t2) & _M64
    for i, v in enumerate((a, b, c, d, e, f, g, hh)):
        h[i] = (h[i] + v) & _M64


class _Sha512:
    """hashlib-style update()/digest(); holds at most one partial block."""

    def __init__(self, data=b""):
        self._h, self._buf, self._n = list(_H0), bytearray(128), 0  # state, pending, length
        self.update(data)

    def update(self, data):
        fill, n = self._n & 127, len(data)
        self._n += n
        i = 0
        if fill:
            i = min(128 - fill, n)
            self._buf[fill : fill + i] = data[:i]
            if fill + i < 128:
                return
            _compress(self._h, self._buf, 0)
        while n - i >= 128:  # whole blocks straight from data, no copy
            _compress(self._h, data, i)
            i += 128
        self._buf[: n - i] = data[i:]

    def digest(self):
        # Pad a copy (0x80, zeros, 128-bit bit length) so the object can still be updated.
        n = self._n
        tail = bytes(self._buf[: n & 127]) + b"\x80" + bytes((111 - n) % 128)
        tail += (n << 3).to_bytes(16, "big")
        h = list(self._h)
        for off in range(0, len(tail), 128):
            _compress(h, tail, off)
        return struct.pack(">8Q", *h)


try:
    from hashlib import sha512 as _sha512
except ImportError:
    _sha512 = _Sha512


def _sq(x, n):  # x^(2^n) in GF(2^255 - 19)
    for _ in range(n):
        x = x * x % _P
    return x


def _pow2_250(z):
    # (z^(2^250 - 1), z^11): what z^(p - 2) and z^((p - 5)/8) are built from, in 254
    # squarings and 11 multiplications, about half the work of square-and-multiply.
    z2 = z * z % _P
    z9 = _sq(z2, 2) * z % _P
    z11 = z9 * z2 % _P
    a = z11 * z11 % _P * z9 % _P  # 2^5 - 1
    b = _sq(a, 5) * a % _P  # 2^10 - 1
    c = _sq(b, 10) * b % _P  # 2^20 - 1
    c = _sq(c, 20) * c % _P  # 2^40 - 1
    c = _sq(c, 10) * b % _P  # 2^50 - 1
    b = _sq(c, 50) * c % _P  # 2^100 - 1
    b = _sq(b, 100) * b % _P  # 2^200 - 1
    return _sq(b, 50) * c % _P, z11  # 2^250 - 1


# --- points in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, xy = T/Z on
# -x^2 + y^2 = 1 + d x^2 y^2 (Hisil, Wong, Carter, Dawson 2008); no inversion until the end ---


def _decode(s):
    # RFC 8032 5.1.3. None unless s is the canonical encoding of a curve point.
    y = int.from_bytes(s, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None  # non-canonical: y and y - p name the same point
    yy = y * y % _P
    u, v = (yy - 1) % _P, (_D * yy + 1) % _P  # x^2 = u / v
    v3 = v * v % _P * v % _P
    uv7 = u * v3 % _P * v3 % _P * v % _P
    t, _ = _pow2_250(uv7)
    x = u * v3 % _P * (_sq(t, 2) * uv7 % _P) % _P  # u v^3 (u v^7)^((p - 5)/8)
    vxx = v * x % _P * x % _P
    if vxx != u:
        if vxx != _P - u:
            return None  # u / v has no square root: y is on no point
        x = x * _SQRT_M1 % _P  # x was sqrt(-u/v)
    if x == 0 and sign:
        return None  # "-0"
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _encode(p):
    t, z11 = _pow2_250(p[2])
    zi = _sq(t, 5) * z11 % _P  # 1/Z = Z^(p - 2) (Fermat)
    x, y = p[0] * zi % _P, p[1] * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _add(p, q):
    # p + q with q in cached form (Y - X, Y + X, 2Z, 2dT): 8 multiplications. The formula
    # is complete: doubling and the identity need no special case.
    x, y, z, t = p
    a = (y - x) * q[0] % _P
    b = (y + x) * q[1] % _P
    c = t * q[3] % _P
    d = z * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p):
    # 2p in 4 multiplications and 4 squarings; the input's T is not used.
    x, y, z = p[0], p[1], p[2]
    a, b = x * x % _P, y * y % _P
    c = 2 * z * z % _P
    e = ((x + y) * (x + y) - a - b) % _P
    g, h = b - a, -a - b
    f = g - c
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _table(x, y):
    # [1]P .. [7]P in cached form for 3-bit windows (index 0 unused). 4-bit windows would
    # save ~10% of the additions (3% of the time) but need ~10 KB more heap at the peak.
    t, q = [None], (x, y, 1, x * y % _P)
    for i in range(7):
        if i:
            q = _add(q, t[1])
        x, y, z, xy = q
        t.append(((y - x) % _P, (y + x) % _P, 2 * z % _P, xy * _D2 % _P))
    return t


def verify(public_key, message, signature):
    """True when signature (64 bytes, R || S) is public_key's Ed25519 signature of message.

    Strict: S < L, public_key and R must be canonical encodings of curve points, and
    public_key must not be of small order. The check is cofactorless, [S]B - [k]A == R, made
    by comparing encodings, so a non-canonical or off-curve R never matches. Bytes of any
    content or length give True or False; only a non-bytes-like argument raises TypeError."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False  # else (R, S + L) would be a second valid signature (malleability)
    a = _decode(public_key)
    if a is None:
        return False
    q = _double(_double(_double(a)))
    if q[0] == 0 and q[1] == q[2]:
        return False  # [8]A = 0: with a small-order key (all-zero bytes is one) forgeries verify
    r = bytes(signature[:32])
    h = _sha512(r)
    h.update(public_key)
    h.update(message)
    k = int.from_bytes(h.digest(), "little") % _L
    # Straus: one chain of doublings for both products, 3 bits of s and k per step.
    tb, ta = _table(_BX, _BY), _table(_P - a[0], a[1])  # B and -A
    q = (0, 1, 1, 0)
    for i in range(252, -3, -3):
        q = _double(_double(_double(q)))
        j = s >> i & 7
        if j:
            q = _add(q, tb[j])
        j = k >> i & 7
        if j:
            q = _add(q, ta[j])
    return _encode(q) == r
