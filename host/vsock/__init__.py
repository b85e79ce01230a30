"""Host side of virtio-vsock: the vhost-vsock device, the hybrid Unix-socket bridge, a host API."""
