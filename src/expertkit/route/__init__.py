"""expertkit.route: planned; see README's capability table."""
