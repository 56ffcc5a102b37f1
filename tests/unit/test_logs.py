import logging

from tunneld import logs


def test_pyroute2_stays_quiet_at_debug_because_its_dumps_carry_the_private_key() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("debug")
        assert root.level == logging.DEBUG
        assert logging.getLogger("pyroute2.netlink.core").getEffectiveLevel() >= logging.WARNING
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
