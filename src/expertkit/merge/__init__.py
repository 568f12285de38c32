"""expertkit.merge: planned; see README's capability table."""
