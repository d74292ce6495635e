"""The application layer: the `crl` command (cli), `crl local`'s launcher, the cluster commands
and the research tools. It sits above everything else: it starts the roles as processes or calls
their entry points; nothing below imports it (tests/test_layering.py)."""
