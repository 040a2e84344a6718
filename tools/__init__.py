"""Developer tools, run from the repository's root:

    python -m tools.bench     # speed and memory against diffusers: BENCHMARKS.md
    python -m tools.figures   # the README's pictures of the position map and the crops
"""
