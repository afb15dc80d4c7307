"""Between ranks: where this process sits (topology), the Store link, and the typed messages
that cross it. Nothing here calls a collective."""
