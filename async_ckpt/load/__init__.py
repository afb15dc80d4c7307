"""Loading: reading verified byte ranges of a committed checkpoint back into registered state."""
