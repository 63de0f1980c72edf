"""The classification kind: `kind.py` (the Kind), `schema.py` (the digits stage's Parquet contract,
which the stage imports too), `metrics.py` (accuracy). Kept empty, so that a stage importing the
contract runs nothing else of the kind."""
