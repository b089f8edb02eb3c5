"""The ``robustcnn`` command line (Typer + Rich). ``python -m cli`` works as well as the installed script."""
