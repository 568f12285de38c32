"""expertkit.port: planned; see README's capability table."""
