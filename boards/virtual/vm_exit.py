# Why the VM stopped, as its exit status (or, on a twin that stops at once, its "halt"
# record in io.log): what the firmware on the VM (vm_startup.py, boards/twins/) tells the
# host runner (tools/keel/vdev.py, through the link tools/keel/vm_exit.py), which starts
# the board again for that reason. Any other status is a crash: the runner restarts the
# board as after a panic. One file for the VM and CPython.
RESET = 100  # the device asked for a reset (machine.reset)
DEEP_SLEEP = 101  # it went into deep sleep (the length is in the I/O log)
POWER_CUT = 102  # fault injection cut its power (faults.json, vm_faults.py)
SOFT_REBOOT_FRIENDLY = 103  # a soft reboot at the console's REPL, in friendly mode
SOFT_REBOOT_RAW = 104  # ... in raw mode (mpremote, keel flash --usb)
