# The app API (system part 2). Apps `import keel`. Docs: docs/api.md.
def system_version():
    """The installed system version, as a semver string."""
    import module_format as mf

    for slot in _slots():
        if slot.function == mf.FUNCTION_SYSTEM_PART and slot.index == 1 and slot.info:
            return mf.decode_version(slot.info.version)
    return None


def _slots():
    import keel_system

    return keel_system.SLOTS


def log(message, level="info"):
    print("[%s] %s" % (level, message))
