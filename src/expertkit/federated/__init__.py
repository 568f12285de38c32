"""expertkit.federated: planned; see README's capability table."""
