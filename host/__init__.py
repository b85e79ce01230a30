"""The host: the vhost backend daemon serving many guests."""
