"""`make bench`: what modulation costs, as ratios measured in one run.

models.py   the realistic sizes each family is benchmarked at (and tiny ones for the test)
timing.py   interleaved, repeated timing: median and spread
run.py      the figures (P1a, P1b, P2, P3, P4, memory, size), the table and build/bench/*.json
"""
