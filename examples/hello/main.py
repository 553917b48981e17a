# The smallest Keel app: prints a greeting when the system starts it.
def setup():
    print("hello from keel")


def loop():
    pass
