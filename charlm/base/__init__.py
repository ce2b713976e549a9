"""Base: what every layer uses (the one error type, atomic file writes)."""
