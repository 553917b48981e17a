# Keel's files on the device: where each layer keeps what another layer, or a host tool,
# reads. Every name of the contract is here, once: the bootloader, the app loader, the
# system, the HAL and the host tools (as keel.keel_files) import it; it imports nothing.
# One file for the MicroPython VM and CPython. Who writes and who reads each file:
# docs/boot-flow.md, "The device's files".
#
# It ships with the bootloader (in /keel/m/bl, since bootloader 1.1.0), so a system part
# that imports it depends on that bootloader. Stage 0 (/boot.py, bootloader/stage0.py) and
# /main.py spell out the few paths they use: they run before /keel/m/bl is on sys.path,
# and must work when what is there is broken.

KEEL_DIR = "/keel"
BOARD_FILE = "/keel/board.json"  # the board definition: the host tools write it
STATUS_FILE = "/keel/status.json"  # the last boot, as the bootloader and the system saw it
RESET_REASON_FILE = "/keel/reset_reason"  # why the system reset, for the next boot

# Module code. Extracted code: a directory per module. Code that runs in place: each
# module's payload mounted from its slot under ROM_ROOT; the digest of what was checked,
# a file per module, in MODULE_ROOT + "/rom".
MODULE_ROOT = "/keel/m"
BOOTLOADER_DIR = "/keel/m/bl"  # always extracted; stage 0 puts it on sys.path
TRUST_FILE = "/keel/m/bl/trust.json"  # the public keys the board trusts (trust.py)
ROM_ROOT = "/keel/rom"
# A new bootloader on trial: stage 0 counts its boots in BOOTLOADER_TRIAL_FILE and goes
# back to the previous copy (BOOTLOADER_DIR + ".prev") unless it proves itself.
BOOTLOADER_TRIAL_FILE = "/keel/bl_trial"
BOOTLOADER_REJECTED_FILE = "/keel/bl_rejected"  # the digest of the one stage 0 gave up

# Updates over the air: the receiver (system/core/ota.py) stages, the bootloader
# (ota_apply.py) installs and runs the trial of a new system part.
OTA_DIR = "/keel/ota"
TRANSFER_FILE = "/keel/ota/transfer.json"  # the transfer being received
BITMAP_FILE = "/keel/ota/bitmap"  # its chunks received
RECEIVED_FILE = "/keel/ota/received.json"  # received, its checks left to the next boot
CHECKED_FILE = "/keel/ota/checked.json"  # what those checks said, for the cloud
PENDING_FILE = "/keel/ota/pending.json"  # verified: the bootloader installs it
APPLY_FILE = "/keel/ota/apply.json"  # the journal of a copy or a swap
SCRATCH_FILE = "/keel/ota/scratch"  # the slot's block being swapped, tagged with its number
INSTALLED_FILE = "/keel/ota/installed.json"  # what went in, for the cloud
REFUSED_FILE = "/keel/ota/refused.json"  # the last update refused
TRIAL_FILE = "/keel/ota/trial.json"  # a new system part proving itself
ROLLBACK_FILE = "/keel/ota/rollback"  # the system asks for a rollback: the reason
ROLLED_BACK_FILE = "/keel/ota/rolled_back.json"  # what the last rollback did, and why

# The app loader's records.
APP_STATE_FILE = "/keel/app_state.json"  # crashes in a row, when the app proved stable
CRASH_FILE = "/keel/crash.txt"  # the last crash's traceback
SAFE_REQUEST_FILE = "/keel/safe_request"  # safe mode asked for at the next boot

# The network and the cloud (keel device provision, keel device wifi write these).
WIFI_FILE = "/keel/wifi.json"  # the networks the board joins
CLOUD_DIR = "/keel/cloud"
CLOUD_FILE = "/keel/cloud/cloud.json"  # the cloud's address and the session's settings
CLOUD_KEY_FILE = "/keel/cloud/key.der"  # the device's identity: its key,
CLOUD_CERT_FILE = "/keel/cloud/cert.der"  # its certificate,
CLOUD_CA_FILE = "/keel/cloud/ca.der"  # and the cloud's CA

DATA_DIR = "/keel/data"  # the app's data
STORE_FILE = "/keel/data/store.json"  # its key-value store (system/services/store.py)
# The nRF52840 has no deep sleep timer: hal/ports/nrf/power.py writes this before its
# reset, so that the next boot's reset cause is "deep-sleep" (bootloader/port_nrf.py).
DEEP_SLEEP_MARKER = "/keel/deep-sleep"
