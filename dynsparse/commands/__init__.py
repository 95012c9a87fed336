"""The ``dynsparse`` subcommands that read model files: ``bench``, ``analyse`` and ``prune``.

Each module has ``add_parser(sub)`` (its arguments, ``func`` set to its ``run(args) -> exit code``); torch and
timm are imported when a command runs, not when ``dynsparse --help`` builds the parsers.
"""
