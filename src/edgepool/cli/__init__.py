"""Thin command-line front end. Each subcommand is a module with ``add_parser`` and ``run``."""
