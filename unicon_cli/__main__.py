"""``python -m unicon_cli``: the same as the ``unicon`` console script."""

from unicon_cli.main import main

main()
