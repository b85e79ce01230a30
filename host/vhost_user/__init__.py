"""vhost-user: QEMU's backend protocol as a second control transport (codec, session, runner)."""
