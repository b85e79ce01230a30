"""The guest: a VM process whose kernel owns the guest RAM and runs virtio drivers."""
