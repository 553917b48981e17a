# Virtual device identity: made once by `keel vdev create` (<device>/uid).
import vboard


def unique_id():
    return vboard.uid
