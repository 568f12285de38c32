"""expertkit.moe: planned; see README's capability table."""
