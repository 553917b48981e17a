# The nrf port of MicroPython v1.28.0 on an nRF52840, as a twin plays it: the modules
# it has that stand-ins replace, and its start-up (ports/nrf/main.c _start, the frozen
# modules/scripts/_boot.py). vm_twin.py calls install() once the simulated hardware is
# up, then boot() once the heap is accounted for. The flash is laid out as the firmware
# build in DEVICE_DIR/firmware.json says (keel vdev create writes it from
# boards/twins/nrf/firmware.json; docs/boards/nrf52840.md).
import sys
import os
import vfs
import micropython
import vm_twin

BANNER = "Keel twin of an nRF52840"
PLATFORM = "nrf"  # mpconfigport.h MICROPY_PY_SYS_PLATFORM; boards override it (BOARDS)

# What differs between the boards' firmware (ports/nrf/boards/<BOARD>/): the
# sys.platform and board name of mpconfigboard.h, the pins of pins.csv (name -> pin
# number; the only pins machine.Pin knows), the UART REPL, UART(0)'s and SPI's default
# pins (MICROPY_HW_UART1_TX/RX, MICROPY_HW_SPI0_SCK/MOSI/MISO).
_XENON_PINS = {
    "LED1": 13, "LED2": 14, "LED3": 15, "A0": 3, "A1": 4, "A2": 28, "A3": 29, "A4": 30,
    "A5": 31, "SPI_SS": 31, "SPI_SCK": 47, "SPI_MOSI": 45, "SPI_MISO": 46, "SPI1_SCK": 33,
    "SPI1_MOSI": 34, "SPI1_MISO": 40, "UART1_RX": 8, "UART1_TX": 6, "UART2_RX": 42,
    "UART2_TX": 40, "SDA": 26, "SCL": 27, "SDA1": 33, "SCL1": 34, "D0": 26, "D1": 27,
    "D2": 33, "D3": 34, "D4": 40, "D5": 42, "D6": 43, "D7": 44, "D8": 35, "D9": 6, "D10": 8,
    "D11": 46, "D12": 45, "D13": 47,
}
BOARDS = {
    "nrf52840_dk": {  # PCA10056
        "platform": "nrf52840-PDK", "name": "PCA10056",
        "pins": {"P%d" % n: n for n in range(48)},
        "uart_repl": True, "uart0": (6, 8), "spi0": (47, 45, 46),
    },
    "particle_xenon": {  # PARTICLE_XENON
        "platform": "PARTICLE-XENON", "name": "XENON",
        "pins": _XENON_PINS,
        "uart_repl": False, "uart0": (6, 8), "spi0": (47, 45, 46),
    },
}
_REPL_BAUD = 115200  # MICROPY_HW_UART_REPL_BAUD


class _Module:
    """A module as the port has it: the VM's own, with what the port adds."""

    def __init__(self, real, **extra):
        for name in dir(real):
            if not name.startswith("__"):
                setattr(self, name, getattr(real, name))
        for name, value in extra.items():
            setattr(self, name, value)


class _Implementation:
    # sys.implementation: the VM's, with the port's _machine "<board> with NRF52840"
    def __init__(self, real, machine):
        for name in ("name", "version", "_mpy", "_build"):
            if hasattr(real, name):
                setattr(self, name, getattr(real, name))
        self._machine = machine


_firmware = {}


def install():
    board = BOARDS[vm_twin.hw.board["name"]]
    _firmware.update(vm_twin.firmware_build())
    proxy = vm_twin.SysProxy(board["platform"])
    proxy.implementation = _Implementation(sys.implementation, board["name"] + " with NRF52840")
    sys.modules["sys"] = proxy
    machine = vm_twin.register("machine")
    machine.setup(board)
    nrf = vm_twin.register("nrf")
    layout = _firmware["layout"]
    nrf.setup((layout["image_end"], layout["romfs"][0], layout["romfs"][1], layout["fs"][0],
               layout["fs"][1]))
    vm_twin.done_registering()
    sys.modules["os"] = _Module(os, dupterm=machine.os_dupterm)
    sys.modules["micropython"] = _Module(micropython, schedule=machine._schedule)
    sys.modules["vfs"] = _Module(vfs, rom_ioctl=_rom_ioctl) if _firmware["vfs_rom"] else vfs
    nrf.romfs_segment()  # (its memory image is the firmware's: made before the heap is counted)
    # No network: ports/nrf has no socket or network module, and leaves MICROPY_PY_SSL
    # at py/mpconfig.h's 0 (so no ssl, no tls). On the board
    # `import socket` fails; on the twin, the VM's own are built in and cannot be taken
    # out of the import, so the name imports and its first use raises the ImportError.
    for name in ("socket", "ssl", "tls", "network"):
        sys.modules[name] = _Absent(name)


class _Absent:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        raise ImportError("no module named '%s'" % self._name)


def _rom_ioctl(op, *args):
    # ports/nrf/modules/nrf/flashbdev.c mp_vfs_rom_ioctl (1.28): one segment, the
    # ROMFS part of the linker script, as the static nrf.Flash over it; -EINVAL else
    import nrf

    segment = nrf.romfs_segment()
    if segment is None:
        return -22
    if op == 1:  # GET_NUMBER_OF_SEGMENTS
        return 1
    if op == 2:  # GET_SEGMENT
        return segment
    return -22


def boot():
    import machine
    import nrf

    board = BOARDS[vm_twin.hw.board["name"]]
    # machine_init(): RESETREAS. A soft reboot finds it cleared and keeps the cause of
    # the boot before, which the twin keeps beside the device (the chip, in its static).
    keep = vm_twin.hw.device_dir + "/reset_cause"
    event = vm_twin.event
    if event == "soft-reboot":
        try:
            with open(keep) as f:
                machine._cause[0] = int(f.read())
        except (OSError, ValueError):
            pass
    else:
        machine._cause[0] = machine._CAUSES.get(event, machine.HARD_RESET)
        with open(keep, "w") as f:
            f.write("%d" % machine._cause[0])
    # mp_init: sys.path; a ROMFS image in the segment would be mounted at /rom (Keel's
    # segment starts with a module's KEEL magic, never a ROMFS header: not modelled).
    vfs.umount("/")  # (the unix port's view of the host: nothing is mounted on a board)
    sys.path[:] = ["", ".frozen", "/lib"]
    if board["uart_repl"]:  # MICROPY_HW_ENABLE_UART_REPL: UART(0) joins the REPL
        machine.os_dupterm(machine.UART(0, _REPL_BAUD))
    # _boot.py: the filesystem at /flash; any error mounting it formats it
    bdev = nrf.Flash()
    try:
        vfs.mount(bdev, "/flash")
    except Exception:  # noqa: BLE001 - as _boot.py's bare except
        try:
            vfs.VfsLfs2.mkfs(bdev)
            vfs.mount(bdev, "/flash")
        except Exception:  # noqa: BLE001
            return
    os.chdir("/flash")
    sys.path.append("/flash")
    sys.path.append("/flash/lib")
