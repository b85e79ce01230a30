"""The guest's virtio-net driver, its frame-level API and a small IPv4 stack."""
