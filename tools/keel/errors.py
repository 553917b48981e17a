class KeelError(Exception):
    """An error the user can act on; the CLI prints it on one line and exits 1."""
