"""The hardware contract both sides share: spec constants, guest memory, ring layout, doorbells, control codec."""
