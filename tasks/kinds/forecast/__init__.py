"""The forecast kind: `kind.py` (the Kind), `schema.py` (the ERA5 contract, which the ERA5 stages
import too), `data.py` (normalised fields, forecast pairs), `metrics.py` (WeatherBench 2 scores) and
`methods.py` (declaration helpers). Kept empty, so that a stage importing the contract runs nothing
else of the kind."""
