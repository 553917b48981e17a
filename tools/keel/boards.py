"""Boards are data (boards/<name>/board.json); this module reads them."""

import json
from dataclasses import dataclass
from pathlib import Path

from keel import module_format as mf
from keel.errors import KeelError
from keel.paths import source_root

# The MicroPython port that runs each platform, which picks the HAL backend.
PLATFORM_PORTS = {"virtual": "virtual", "esp32": "esp32", "nrf52840": "nrf"}


@dataclass
class Partition:
    label: str
    offset: int
    size: int
    function: int | None = None
    index: int = 0
    # Where offset is counted from: None for the flash's start; on boards whose
    # firmware decides where Keel's flash is (nRF52840), "keel" (the Keel region) or
    # "fs" (the firmware's filesystem), placed by board_from_dict's regions.
    region: str | None = None


@dataclass
class Board:
    name: str
    platform: str
    port: str
    ram: int
    heap: int
    flash_size: int
    block_size: int
    partitions: list[Partition]
    data: dict

    def partition(self, label: str) -> Partition:
        for p in self.partitions:
            if p.label == label:
                return p
        raise KeelError(f"board {self.name} has no '{label}' partition")

    def slot_for(self, function: int, index: int) -> Partition | None:
        for p in self.partitions:
            if p.function == function and p.index == index:
                return p
        return None

    @property
    def platform_id(self) -> int:
        return mf.platform_id(self.platform)


def board_dir(name: str) -> Path:
    return source_root() / "boards" / name


def known_boards() -> list[str]:
    root = source_root() / "boards"
    return sorted(p.parent.name for p in root.glob("*/board.json"))


def load_board(name: str) -> Board:
    path = board_dir(name) / "board.json"
    if not path.is_file():
        raise KeelError(f"unknown board '{name}' (known: {', '.join(known_boards())})")
    return board_from_dict(json.loads(path.read_text()))


def board_from_dict(data: dict, regions: dict | None = None) -> Board:
    """regions: where a firmware put the board's regions, {name: (address, size)}: a
    partition in one then has its address (a region's whole size for "fs", which is
    the firmware's filesystem); without them its offset stays relative."""
    partitions = []
    for p in data["flash"]["partitions"]:
        function = mf.function_id(p["module"]) if p.get("module") else None
        offset, size, region = p["offset"], p["size"], p.get("region")
        if regions and region in regions:
            start, length = regions[region]
            offset += start
            size = length if region == "fs" else size
        partitions.append(Partition(p["label"], offset, size, function, p.get("index", 0),
                                    region))
    return Board(
        name=data["name"],
        platform=data["platform"],
        port=data["port"],
        ram=data["ram"],
        heap=data.get("heap", data["ram"]),
        flash_size=data["flash"]["size"],
        block_size=data["flash"]["block_size"],
        partitions=partitions,
        data=data,
    )
