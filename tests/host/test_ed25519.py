"""bootloader/ed25519.py on CPython: RFC 8032 vectors, signatures from `cryptography`, the
strictness rules, and the pure SHA-512 the device uses against hashlib."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ed25519", REPO / "bootloader" / "ed25519.py")
ed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ed)

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032 section 7.1: (secret key, public key, message, signature), hex.
RFC8032 = {
    "TEST 1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    "TEST 2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    "TEST 3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    "TEST 1024": (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f5"
        "4e9f77b1e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37"
        "c93a1b270b20329d658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efc"
        "b8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b"
        "3b310da903401aa62100ab5d1a36553e06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573c"
        "b116dbefefd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204"
        "ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d95629e9855a94a7c1958"
        "d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
        "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f27088d78b7e883c8759d2c4f5c6"
        "5adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2"
        "cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128bab27af87a"
        "71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
        "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9"
        "b47acdb751fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb"
        "038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f672451"
        "7b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
        "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e"
        "2ab47b57f7f7276cd419c17a3ca8e1b939ae49e488acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d"
        "5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e6aed3fb0"
        "f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5fb93246f6b1116398a346f1a641f3b041"
        "e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa9"
        "33a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380db2eaaa707b4c4185"
        "c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8cac60c905c"
        "15fc910840b94c00a0b9d0",
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    "TEST SHA(abc)": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
}


def raw_public(key):
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def encode_y(y, sign=0):
    """A 32-byte point encoding with y taken as is (it may be >= p) and the sign bit."""
    return (y | sign << 255).to_bytes(32, "little")


def has_x(y):
    """Whether some x puts (x, y) on the curve: (y^2 - 1)/(d y^2 + 1) is a square mod p."""
    d = -121665 * pow(121666, -1, P) % P
    u = (y * y - 1) * pow(d * y * y + 1, -1, P) % P
    return u == 0 or pow(u, (P - 1) // 2, P) == 1


# --- RFC 8032 ---


@pytest.mark.parametrize("name", list(RFC8032))
def test_rfc8032_vectors(name):
    secret, public, message, signature = (bytes.fromhex(h) for h in RFC8032[name])
    # The vectors were typed in: cryptography must derive the same key and signature.
    key = Ed25519PrivateKey.from_private_bytes(secret)
    assert raw_public(key) == public
    assert key.sign(message) == signature
    assert ed.verify(public, message, signature) is True
    assert ed.verify(public, message + b"\0", signature) is False


@pytest.mark.parametrize("name", list(RFC8032))
def test_rfc8032_vectors_with_the_pure_sha512(name, monkeypatch):
    # What the device runs: no hashlib.sha512.
    monkeypatch.setattr(ed, "_sha512", ed._Sha512)
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032[name])
    assert ed.verify(public, message, signature) is True
    assert ed.verify(public, message[:-1] if message else b"x", signature) is False


def test_curve_constants_follow_from_their_definitions():
    d = -121665 * pow(121666, -1, P) % P
    assert (ed._P, ed._L, ed._D, ed._D2) == (P, L, d, 2 * d % P)
    assert ed._SQRT_M1 == pow(2, (P - 1) // 4, P) and ed._SQRT_M1**2 % P == P - 1
    x, y = ed._BX, ed._BY
    assert y * 5 % P == 4 and x % 2 == 0  # B = (+x, 4/5)
    assert (-x * x + y * y) % P == (1 + d * x * x * y * y) % P


def test_sha512_constants_are_the_prime_roots():
    def root(n, k):  # floor(n ** (1/k)), by Newton's method on integers
        x = 1 << -(-n.bit_length() // k)
        while (y := ((k - 1) * x + n // x ** (k - 1)) // k) < x:
            x = y
        return x

    primes = [n for n in range(2, 410) if all(n % q for q in range(2, n))]
    assert len(primes) == 80
    assert ed._H0 == tuple(root(p << 128, 2) % 2**64 for p in primes[:8])
    assert ed._K == tuple(root(p << 192, 3) % 2**64 for p in primes)


@given(z=st.integers(1, P - 1))
def test_addition_chain(z):
    t, z11 = ed._pow2_250(z)
    assert (t, z11) == (pow(z, 2**250 - 1, P), pow(z, 11, P))


# --- SHA-512 ---

BOUNDARIES = [111, 112, 113, 127, 128, 129, 239, 240, 241, 255, 256, 257]


@pytest.mark.parametrize("length", list(range(0, 300)) + BOUNDARIES + [1023, 4096 + 17])
def test_pure_sha512_matches_hashlib(length):
    data = bytes((i * 131 + length) & 0xFF for i in range(length))
    assert ed._Sha512(data).digest() == hashlib.sha512(data).digest()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700), cuts=st.lists(st.integers(0, 700), max_size=6))
def test_pure_sha512_in_pieces(data, cuts):
    h = ed._Sha512()
    at = 0
    for cut in sorted(min(c, len(data)) for c in cuts):
        h.update(memoryview(data)[at:cut])  # any bytes-like piece, empty ones too
        at = cut
    h.update(bytearray(data[at:]))
    assert h.digest() == hashlib.sha512(data).digest()


def test_pure_sha512_digest_does_not_end_the_hash():
    h = ed._Sha512(b"a" * 120)
    first = h.digest()
    assert h.digest() == first
    h.update(b"b" * 20)
    assert h.digest() == hashlib.sha512(b"a" * 120 + b"b" * 20).digest()


def test_hashlib_sha512_is_used_where_it_exists():
    assert ed._sha512 is hashlib.sha512


# --- signatures from cryptography ---


@settings(max_examples=150, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=300),
    data=st.data(),
)
def test_cryptography_signatures_verify_and_any_flipped_bit_is_refused(secret, message, data):
    key = Ed25519PrivateKey.from_private_bytes(secret)
    public, signature = raw_public(key), key.sign(message)
    assert ed.verify(public, message, signature) is True

    parts = {"signature": signature, "public": public, "message": message}
    which = data.draw(st.sampled_from([k for k, v in parts.items() if v]))
    bit = data.draw(st.integers(0, 8 * len(parts[which]) - 1))
    flipped = bytearray(parts[which])
    flipped[bit // 8] ^= 1 << (bit % 8)
    parts[which] = bytes(flipped)
    verdict = ed.verify(parts["public"], parts["message"], parts["signature"])
    assert verdict is False, (which, bit)
    assert verdict == cryptography_verdict(parts["public"], parts["message"], parts["signature"])


def cryptography_verdict(public, message, signature):
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_the_message_the_bootloader_will_check():
    key = Ed25519PrivateKey.generate()
    message = b"KEELSIG1" + hashlib.sha256(b"a module image").digest()
    signature = key.sign(message)
    assert ed.verify(raw_public(key), message, signature) is True
    other = b"KEELSIG1" + hashlib.sha256(b"another image").digest()
    assert ed.verify(raw_public(key), other, signature) is False
    assert ed.verify(raw_public(Ed25519PrivateKey.generate()), message, signature) is False


def test_bytes_like_arguments():
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032["TEST 3"])
    assert ed.verify(bytearray(public), memoryview(message), memoryview(signature)) is True
    assert ed.verify(memoryview(public), bytearray(message), bytearray(signature)) is True


# --- strictness: each of these is False, without raising ---


def rfc_test1():
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032["TEST 1"])
    return public, message, signature


def with_s(signature, s):
    return signature[:32] + s.to_bytes(32, "little")


def test_s_plus_l_is_refused():
    public, message, signature = rfc_test1()
    s = int.from_bytes(signature[32:], "little")
    # [S + L]B == [S]B, so only the range check stands between this and a second signature.
    assert ed.verify(public, message, with_s(signature, s + L)) is False
    assert ed.verify(public, message, with_s(signature, s + 2 * L)) is False
    assert cryptography_verdict(public, message, with_s(signature, s + L)) is False


@pytest.mark.parametrize("s", [L, L + 1, 2**253, 2**256 - 1])
def test_s_at_or_above_l_is_refused(s):
    public, message, signature = rfc_test1()
    assert ed.verify(public, message, with_s(signature, s)) is False


def affine_add(p, q):
    """Edwards addition in affine coordinates, independent of the module's formulas."""
    (x1, y1), (x2, y2) = p, q
    t = ed._D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + y1 * x2) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def affine_mul(n, p):
    q = (0, 1)
    for bit in bin(n)[2:]:
        q = affine_add(q, q)
        if bit == "1":
            q = affine_add(q, p)
    return q


def encode(p):
    return encode_y(p[1], p[0] & 1)


def small_order_points():
    """The 8 points T with [8]T = 0, as [L]Q for points Q of the whole curve."""
    found, y = set(), 2
    while len(found) < 8:
        q = ed._decode(encode_y(y))
        if q is not None:
            found.add(affine_mul(L, q[:2]))
        y += 1
    return sorted(found)


SMALL_ORDER = small_order_points()


def test_small_order_points_are_the_8_torsion_points():
    assert (0, 1) in SMALL_ORDER and (0, P - 1) in SMALL_ORDER
    for t in SMALL_ORDER:
        assert affine_mul(8, t) == (0, 1)
        assert ed._decode(encode(t))[:2] == t


@pytest.mark.parametrize("t", SMALL_ORDER, ids=lambda t: encode(t).hex()[:8])
def test_small_order_public_keys_are_refused(t):
    # R = the identity, S = 0: [0]B - [k]T = R holds whenever the order of T divides k, so
    # with such a key some message in 8 verifies under a cofactorless check without it.
    public, r = encode(t), encode_y(1)
    message = next(
        m for m in (b"%d" % i for i in range(1000))
        if affine_mul(int.from_bytes(hashlib.sha512(r + public + m).digest(), "little") % L, t)
        == (0, 1)
    )
    assert ed.verify(public, message, r + bytes(32)) is False


def test_all_zero_key_forgery_is_refused():
    # Bytes 0 decode to (sqrt(-1), 0), of order 4; this k is 3 mod 4, so R = A, S = 0 is
    # a valid signature under the plain cofactorless equation, and OpenSSL takes it.
    assert cryptography_verdict(bytes(32), bytes(200), bytes(64)) is True
    assert ed.verify(bytes(32), bytes(200), bytes(64)) is False


def clamped_scalar(seed):
    """The secret scalar a of an RFC 8032 key: A = [a]B."""
    a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    return a & ((1 << 254) - 8) | 1 << 254


def signature_with_r(seed, message, r):
    """A signature whose R is the identity, written as the bytes r: S = k a, so that
    [S]B = [k]A = R + [k]A whichever encoding of the identity r is."""
    public = raw_public(Ed25519PrivateKey.from_private_bytes(seed))
    k = int.from_bytes(hashlib.sha512(r + public + message).digest(), "little") % L
    return public, r + (k * clamped_scalar(seed) % L).to_bytes(32, "little")


@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=100))
@settings(max_examples=30, deadline=None)
def test_r_as_canonical_identity_verifies(seed, message):
    public, signature = signature_with_r(seed, message, encode_y(1))
    assert ed.verify(public, message, signature) is True
    assert cryptography_verdict(public, message, signature) is True


@pytest.mark.parametrize(
    "r", [encode_y(P + 1), encode_y(1, sign=1)], ids=["y=p+1", "x=0,sign=1"]
)
def test_non_canonical_r_is_refused(r):
    # The same point as the signature above, in an encoding that is not canonical.
    seed, message = bytes(range(32)), b"KEELSIG1" + bytes(32)
    public, signature = signature_with_r(seed, message, r)
    assert ed.verify(public, message, signature) is False


@pytest.mark.parametrize("y", range(P, 2**255))
def test_y_at_or_above_p_never_decodes(y):
    assert ed._decode(encode_y(y)) is None and ed._decode(encode_y(y, 1)) is None
    public, message, signature = rfc_test1()
    assert ed.verify(encode_y(y), message, signature) is False


@pytest.mark.parametrize("public", [encode_y(1, sign=1), encode_y(P - 1, sign=1)])
def test_x_zero_with_the_sign_bit_set_is_refused(public):
    assert ed._decode(public) is None
    assert ed._decode(public[:31] + bytes([public[31] & 0x7F])) is not None


@pytest.mark.parametrize(
    "y, sign", [(P, 0), (P, 1), (P + 5, 0), (2**255 - 1, 1), (P - 1, 1)]
)
def test_public_key_with_y_at_or_above_p_or_minus_zero(y, sign):
    public, message, signature = rfc_test1()
    assert ed.verify(encode_y(y, sign), message, signature) is False
    assert ed._decode(encode_y(y, sign)) is None


def test_y_equal_p_is_refused_though_y_zero_is_a_point():
    assert ed._decode(encode_y(0)) is not None
    assert ed._decode(encode_y(P)) is None


def non_square_ys(count):
    y, found = 2, []
    while len(found) < count:
        if not has_x(y):
            found.append(y)
        y += 1
    return found


@pytest.mark.parametrize("y", non_square_ys(4))
def test_y_with_no_point_is_refused(y):
    public, message, signature = rfc_test1()
    for sign in (0, 1):
        assert ed._decode(encode_y(y, sign)) is None
        assert ed.verify(encode_y(y, sign), message, signature) is False
        assert ed.verify(public, message, encode_y(y, sign) + signature[32:]) is False


@pytest.mark.parametrize("y", [y for y in range(2, 40) if has_x(y)][:4])
def test_decoded_points_are_on_the_curve(y):
    for sign in (0, 1):
        x, y2, z, t = ed._decode(encode_y(y, sign))
        assert (y2, z, t) == (y, 1, x * y % P) and x % 2 == sign
        assert (-x * x + y * y - 1 - ed._D * x * x * y * y) % P == 0


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_wrong_public_key_length(length):
    public, message, signature = rfc_test1()
    assert ed.verify((public * 3)[:length], message, signature) is False


@pytest.mark.parametrize("length", [0, 1, 32, 63, 65, 128])
def test_wrong_signature_length(length):
    public, message, signature = rfc_test1()
    assert ed.verify(public, message, (signature * 3)[:length]) is False


def test_all_zero_and_all_ones_inputs():
    for fill in (b"\0", b"\xff"):
        assert ed.verify(fill * 32, b"", fill * 64) is False
        assert ed.verify(fill * 32, fill * 200, fill * 64) is False


@settings(max_examples=300, deadline=None)
@given(
    public=st.binary(max_size=40),
    message=st.binary(max_size=200),
    signature=st.binary(max_size=80),
)
def test_hostile_bytes_give_a_verdict_without_raising(public, message, signature):
    assert ed.verify(public, message, signature) is False


@settings(max_examples=200, deadline=None)
@given(public=st.binary(min_size=32, max_size=32), r=st.binary(min_size=32, max_size=32),
       s=st.integers(0, L - 1))
def test_random_keys_and_r_are_refused(public, r, s):
    assert ed.verify(public, b"m", r + s.to_bytes(32, "little")) is False


@pytest.mark.parametrize("bad", [None, 5, "x"], ids=["None", "int", "str"])
def test_non_bytes_arguments_raise_type_error(bad):
    args = rfc_test1()
    for i in range(3):
        wrong = list(args)
        wrong[i] = bad * len(args[i]) if isinstance(bad, str) else bad  # a str of the right length
        with pytest.raises(TypeError):
            ed.verify(*wrong)
