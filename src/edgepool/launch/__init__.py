"""Starting ranks: local processes (``local``), torchrun commands for real hosts (``hosts``)."""
