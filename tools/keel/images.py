"""Reading and checking module images on the host (keel inspect, flashing)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from keel import module_check
from keel import module_format as mf
from keel.errors import KeelError


@dataclass
class Image:
    """A module image read from a file, with what its integrity checks found."""

    path: Path
    data: bytes
    info: mf.ModuleInfo
    crc_ok: bool
    sha256_ok: bool
    # (reason, message) when the payload is not what the header says: the bootloader's
    # own rule (bootloader/module_check.py), so a board would refuse it too
    refusal: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.crc_ok and self.sha256_ok and self.refusal is None

    @property
    def problem(self) -> str | None:
        if not self.crc_ok:
            return "CRC32 mismatch: the image is corrupt"
        if not self.sha256_ok:
            return "SHA-256 mismatch: the image is corrupt"
        if self.refusal is not None:
            return (f"{self.name}: the payload is not what the header says "
                    f"({self.refusal[0]}): {self.refusal[1]}")
        return None

    @property
    def name(self) -> str:
        return module_label(self.info)

    @property
    def signed_by(self) -> str | None:
        """The fingerprint of the key the module says signed it (docs/signing.md), or None."""
        block = mf.signature_block(mf.bytes_reader(self.data), self.info,
                                   bytearray(mf.SIGNATURE_SIZE))
        return block[0].hex() if block else None

    def to_dict(self) -> dict:
        doc = self.info.to_dict()
        doc.update(size=len(self.data), crc_ok=self.crc_ok, sha256_ok=self.sha256_ok,
                   signed_by=self.signed_by, content_ok=self.refusal is None)
        if self.refusal is not None:
            doc["refused"] = {"reason": self.refusal[0], "message": self.refusal[1]}
        return doc


def module_label(info: mf.ModuleInfo) -> str:
    name = mf.function_name(info.function)
    if info.function == mf.FUNCTION_SYSTEM_PART:
        name += f" {info.index}"
    return f"{name} {mf.decode_version(info.version)}"


def parse_image(data: bytes, path: Path | str = "<bytes>") -> Image:
    """Check an image held in memory. Raises KeelError if it cannot be read at all."""
    try:
        info, crc_ok, sha_ok = mf.check_image(mf.bytes_reader(data), len(data), hashlib.sha256)
    except mf.FormatError as e:
        raise KeelError(f"{path}: {e}") from None
    if len(data) > info.image_size:
        extra = len(data) - info.image_size
        raise KeelError(f"{path}: {extra} bytes after the end of the module (corrupt or not a module)")
    refusal = module_check.check(mf.bytes_reader(data), info, info.function, info.index)
    return Image(Path(path), data, info, crc_ok, bool(sha_ok), refusal)


def read_image(path: Path | str) -> Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeelError(f"{path}: {e.strerror}") from None
    return parse_image(data, path)


def load_valid_image(path: Path | str) -> Image:
    """Read an image and refuse it unless it is intact."""
    image = read_image(path)
    if not image.ok:
        raise KeelError(f"{path}: {image.problem}")
    return image


def folder_images(folder: Path | str) -> list[Image]:
    """Every module image (*.bin) in a folder (keel build system -o DIR), each checked,
    by file name; a clear error when the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.exists():
        raise KeelError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise KeelError(f"{folder}: not a folder (give the folder of module images)")
    images = [load_valid_image(p) for p in sorted(folder.glob("*.bin"))]
    if not images:
        raise KeelError(f"{folder}: no module images (*.bin) in this folder")
    return images


def describe(image: Image) -> str:
    """Human-readable inspect output."""
    info = image.info
    lines = [
        f"{image.path}",
        f"  function      {mf.function_name(info.function)}",
        f"  index         {info.index}",
        f"  version       {mf.decode_version(info.version)}"
        + ("  (prerelease)" if mf.is_prerelease(info.version) else ""),
        f"  platform      {mf.platform_name(info.platform)}",
        f"  size          {len(image.data)} bytes (payload {info.payload_size})",
        f"  crc32         {'ok' if image.crc_ok else 'MISMATCH'}",
        f"  sha256        {'ok' if image.sha256_ok else 'MISMATCH'}",
        "  content       " + ("ok" if image.refusal is None else
                              f"REFUSED ({image.refusal[0]}): {image.refusal[1]}"),
        f"  signed by     {image.signed_by or 'nobody (unsigned: only development boards take it)'}",
    ]
    if info.dependencies:
        lines.append("  depends on")
        for d in info.dependencies:
            dep = mf.dependency_dict(d)
            lines.append(f"    {dep['function']} {dep['index']} >= {dep['version']}")
    else:
        lines.append("  depends on    nothing")
    return "\n".join(lines)
