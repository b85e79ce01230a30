"""Live migration of a guest (pre-copy, as QEMU's migration/ram.c does it): precopy.py decides,
stream.py frames, source.py and incoming.py move the bytes. docs/DESIGN.md "Live migration"."""
