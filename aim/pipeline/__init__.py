"""The pipeline of `make engine` (build.py, over the steps in steps.py), `aim verify` (verify.py)
and the report of a build (report.py)."""
