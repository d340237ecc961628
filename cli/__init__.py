"""``pa-clip``: the one command a user learns (``cli.main``). Each subcommand is a module's own command line; the
module forms (``python -m serve``, ``client/infer.py``, ...) keep working. This package sits above every other and
may import them all; none imports it."""
