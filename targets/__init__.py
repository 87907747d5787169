"""Hardware target descriptions, installed as `duccio_fx.targets`.

Target files (TOML, one per board) and their schema are added by the targets work item; this package
exists now so the install layout (`targets/` → `duccio_fx.targets`) is fixed and tested from the start.
"""
