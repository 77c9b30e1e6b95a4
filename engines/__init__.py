"""Engines: build, run and verify. Heavy backends are imported inside the functions that need them."""
