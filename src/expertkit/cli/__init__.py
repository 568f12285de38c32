"""The ``expertkit`` command line: each command parses, validates and calls one library function."""
