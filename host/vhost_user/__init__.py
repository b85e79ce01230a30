"""vhost-user: QEMU's backend protocol as a second control transport (its codec and its listener;
the session is host/session.py)."""
