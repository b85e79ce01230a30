"""virtio-net's hardware contract: feature bits, the virtio_net_hdr, the config space, MAC/IP parsing."""
