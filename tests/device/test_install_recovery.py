"""An install interrupted between its two renames still boots (stage0 recovery)."""

from keel import vdev


def _rename_in_fs(dev, moves):
    flash = vdev.VirtualDevice(dev.path)
    data, board = flash.read_flash(), flash.board()
    fs = flash.open_fs(data, board)
    fs.mount()
    for src, dst in moves:
        fs.rename(src, dst)
    flash.store_fs(data, board, fs)
    flash.write_flash(data)


def test_bootloader_code_left_as_old_copy_only(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.run(until="hello from keel")
    _rename_in_fs(dev, [("/keel/m/bl", "/keel/m/bl.old")])
    assert "hello from keel" in dev.run(until="hello from keel")


def test_bootloader_code_left_as_new_copy_only(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.run(until="hello from keel")
    _rename_in_fs(dev, [("/keel/m/bl", "/keel/m/bl.new")])
    assert "hello from keel" in dev.run(until="hello from keel")


def test_system_code_missing_is_extracted_again(device, hello_app):
    dev = device("1.1.0")
    dev.flash(hello_app())
    dev.run(until="hello from keel")
    _rename_in_fs(dev, [("/keel/m/s1", "/keel/m/s1.old")])
    console = dev.run(until="hello from keel")
    assert "installing system1" in console
