"""Apps for people: the `charlm` command and the playground server."""
