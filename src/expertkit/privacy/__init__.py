"""expertkit.privacy: planned; see README's capability table."""
