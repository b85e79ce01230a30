"""vhost-net: the host end of a guest's virtio-net device, and the backends behind it."""
