# tls, as the esp32 port builds it (extmod/modtls_mbedtls.c, v1.28.0) over ESP-IDF's
# mbedTLS, which allocates from the ESP-IDF heap, not MicroPython's GC heap
# (CONFIG_MBEDTLS_DEFAULT_MEM_ALLOC=y, ports/esp32/boards/sdkconfig.base; the bundled
# mbedTLS the unix port uses takes the GC heap instead: m_tracked_calloc,
# extmod/mbedtls/mbedtls_config_common.h). So on the twin every call that makes or frees
# mbedTLS's state (a context, its certificates, a socket's buffers, the handshake) runs
# through vm_twin.outside(): what it takes is left out of the board's heap. Once the
# handshake is over a socket's reads and writes allocate nothing and run as they are.
import tls as _vm

import vm_twin

for _name in dir(_vm):
    if not _name.startswith("__") and _name != "SSLContext":
        globals()[_name] = getattr(_vm, _name)
del _name


class SSLContext:
    def __init__(self, protocol):
        self._ctx = vm_twin.outside(_vm.SSLContext, protocol)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    @property
    def verify_mode(self):
        return self._ctx.verify_mode

    @verify_mode.setter
    def verify_mode(self, mode):
        self._ctx.verify_mode = mode

    def load_cert_chain(self, cert, key):
        return vm_twin.outside(self._ctx.load_cert_chain, cert, key)

    def load_verify_locations(self, cadata=None):
        return vm_twin.outside(self._ctx.load_verify_locations, cadata)

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,
                    server_hostname=None):
        return _Socket(vm_twin.outside(self._ctx.wrap_socket, sock, server_side=server_side,
                                       do_handshake_on_connect=do_handshake_on_connect,
                                       server_hostname=server_hostname),
                       do_handshake_on_connect)


class _Socket:
    """An SSLSocket; until the handshake is over (the first bytes read), each call may
    make mbedTLS state."""

    def __init__(self, sock, shaken):
        self._sock = sock
        self._shaken = shaken

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def readinto(self, buf, n=-1):
        if self._shaken:
            return self._sock.readinto(buf) if n < 0 else self._sock.readinto(buf, n)
        got = vm_twin.outside(self._sock.readinto, buf) if n < 0 else \
            vm_twin.outside(self._sock.readinto, buf, n)
        if got:
            self._shaken = True
        return got

    def read(self, n=-1):
        got = self._sock.read(n) if self._shaken else vm_twin.outside(self._sock.read, n)
        if got:
            self._shaken = True
        return got

    def write(self, buf):
        return self._sock.write(buf) if self._shaken else vm_twin.outside(self._sock.write, buf)

    def close(self):
        return vm_twin.outside(self._sock.close)
