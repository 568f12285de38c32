"""expertkit.tasks: planned; see README's capability table."""
