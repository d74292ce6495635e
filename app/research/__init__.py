"""Research workflow: sweeps, reports, critic maps and rendered episodes (`crl sweep`, `crl report`,
`crl critic-map`, `crl render`).

Every module here is cheap to import (no JAX, no plotting at import time): `crl --help` imports
them all. Plots are drawn with Pillow (a dependency of Brax) by app.research.plot.
"""
