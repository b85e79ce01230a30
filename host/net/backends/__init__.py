"""vhost-net backends: where a guest's frames go. Each is non-blocking: send(frame) -> bool
(False = full), recv() -> bytes | None, writable() -> bool, fileno() for runners to poll, close()."""
