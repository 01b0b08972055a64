"""The ``unicon`` command line, one layer above every package.

:mod:`unicon_cli.main` builds the root application from the sub-applications of
:mod:`unicon_model`, :mod:`client`, :mod:`server` and :mod:`simulations` with plain imports,
so the import graph (and a type checker) sees every command; no lower package refers back
to it.
"""
