"""One error type per layer (the rust-vmm shape)."""


class GuestMemoryError(Exception):
    """A guest-physical range is outside every region of the memory table (ring rule 11)."""


class VringError(Exception):
    """The guest broke a split-ring rule. `rule` is the row of docs/ring-rules.md it broke."""

    def __init__(self, rule: int, message: str):
        super().__init__(f"ring rule {rule}: {message}")
        self.rule = rule
        self.message = message


class ProtocolError(Exception):
    """A control-plane message was malformed, oversized or out of order."""

    def __init__(self, message: str, code: str = "EPROTO"):
        super().__init__(message)
        self.code = code
