"""`make bench`: what modulation costs, as ratios measured in one run, each with its 95% interval.

models.py      the realistic sizes each family is benchmarked at (and tiny ones for the test)
timing.py      interleaved rounds: every variant runs once per round
confidence.py  a figure per round, its median and distribution-free interval, the verdict, more rounds
figures.py     the figures' names and targets
run.py         the family figures (latency, speed-up over PyTorch, subgraph cost, bytes, memory)
generation.py  decode tokens/s against Optimum and transformers on a 135M-class checkpoint
table.py       the printed table; build/bench/bench.json holds the same
"""
