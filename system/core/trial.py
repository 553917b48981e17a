# A new system part on trial (docs/boot-flow.md, "Updates and rollback"): it proves
# itself by reaching the cloud within the trial's time limit. Until then the previous
# part waits in the staging partition; on timeout the system asks the bootloader to
# put it back. keel_system imports this only while a trial runs.
import time
import flashfs
import runtime
from keel_files import CLOUD_FILE, ROLLBACK_FILE, TRIAL_FILE

_trial = [None]  # the trial's record while it runs
_status = [None]


def start(status):
    """Watch the trial in the system loop; on a device with no cloud to reach
    (not provisioned) booting is all it can prove."""
    doc = flashfs.read_json(TRIAL_FILE)
    if not isinstance(doc, dict):
        return
    _trial[0] = doc
    _status[0] = status
    status.doc["trial"] = {"slot": doc.get("slot"), "version": doc.get("version"),
                           "previous": doc.get("backup", {}).get("version")}
    if not flashfs.exists(CLOUD_FILE):
        passed("booted; this device has no cloud to reach")
        return
    limit_ms = int(doc.get("trial_s") or 300) * 1000
    began = time.ticks_ms()

    def watch():
        if _trial[0] is not None and time.ticks_diff(time.ticks_ms(), began) >= limit_ms:
            _trial[0] = None
            import keel_system

            print("keel: %s %s did not reach the cloud within %d s"
                  % (doc.get("slot"), doc.get("version"), limit_ms // 1000))
            flashfs.write_atomic(ROLLBACK_FILE, "no-cloud")
            keel_system.reset("rollback")

    runtime.add_service(watch)


def passed(how="reached the cloud"):
    """The part on trial proved itself: it stays, and staging is free again."""
    doc = _trial[0]
    if doc is None:
        return
    _trial[0] = None
    flashfs.remove_tree(TRIAL_FILE)
    _status[0].set(trial=None)
    print("keel: %s %s %s: it stays" % (doc.get("slot"), doc.get("version"), how))
