"""`python -m duccio_fx.cli`: the same as the `duccio-fx` command."""

from duccio_fx.cli.app import main

main()
