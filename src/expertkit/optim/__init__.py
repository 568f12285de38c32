"""expertkit.optim: planned; see README's capability table."""
