"""`python -m duccio_fx` (and `torchrun ... -m duccio_fx optimize ...`): the `duccio-fx` command."""

from duccio_fx.cli.app import main

main()
