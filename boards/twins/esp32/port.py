# The esp32 port of MicroPython v1.28.0 on an ESP32, as a twin plays it: the modules
# it has that stand-ins replace, and its start-up (ports/esp32/main.c mp_task, the
# frozen modules/_boot.py, flashbdev.py and inisetup.py). vm_twin.py calls install()
# once the simulated hardware is up, then boot() once the heap is accounted for.
import sys
import os
import vfs
import vm_twin

BANNER = "Keel twin of an ESP32"
PLATFORM = "esp32"  # mpconfigport.h MICROPY_PY_SYS_PLATFORM


def install():
    # The port's modules that Keel or its apps import. vfs as esp32_common.cmake builds
    # it: FAT and LittleFS v2, no VfsPosix; VfsRom and vfs.rom_ioctl only in a build
    # with MICROPY_VFS_ROM (stock ESP32_GENERIC has none; DEVICE_DIR/firmware.json says
    # which build the twin plays, as keel vdev create --firmware chose it).
    sys.modules["sys"] = vm_twin.SysProxy(PLATFORM)
    for name in ("machine", "esp32", "network", "neopixel", "socket", "tls"):
        vm_twin.register(name)
    vm_twin.done_registering()
    build = vm_twin.firmware_build()  # (none: a device made before the choice, stock)
    if build and build["vfs_rom"]:
        import esp32

        view = vm_twin.ModuleView(vfs, ("mount", "umount", "VfsFat", "VfsLfs2", "VfsRom"))
        view.rom_ioctl = esp32.rom_ioctl
        esp32.romfs_partition()  # (its memory image is the firmware's: made before the heap is counted)
    else:
        view = vm_twin.ModuleView(vfs, ("mount", "umount", "VfsFat", "VfsLfs2"))
    sys.modules["vfs"] = view


def boot():
    # _boot.py: mount the data partition labelled vfs (flashbdev.py) at /; when that
    # fails, inisetup.setup(). Then mp_init's sys.path: '', '.frozen', '/lib'.
    import esp32

    bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")
    if not bdev:
        bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="ffat", block_size=512)
    bdev = bdev[0] if bdev else None
    vfs.umount("/")  # (the unix port's view of the host: nothing is mounted on a board)
    try:
        if bdev:
            vfs.mount(bdev, "/")
    except OSError:
        _setup(bdev)
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]


def _setup(bdev):
    # inisetup.py: a blank partition (its first sector erased) is formatted as LittleFS
    # and gets a boot.py; anything else is a corrupted filesystem, said every 3 s.
    buf = bytearray(bdev.ioctl(5, 0))
    bdev.readblocks(0, buf)
    if any(b != 0xFF for b in buf):
        import time

        while True:
            print("The filesystem appears to be corrupted. If you had important data there, you\n"
                  "may want to make a flash snapshot to try to recover it. Otherwise, perform\n"
                  "factory reprogramming of MicroPython firmware (completely erase flash, followed\n"
                  "by firmware programming).\n")
            time.sleep(3)
    print("Performing initial setup")
    vfs.VfsLfs2.mkfs(bdev)
    vfs.mount(vfs.VfsLfs2(bdev), "/")
    with open("/boot.py", "w") as f:
        f.write("# This file is executed on every boot (including wake-boot from deepsleep)\n"
                "#import esp\n#esp.osdebug(None)\n#import webrepl\n#webrepl.start()\n")
