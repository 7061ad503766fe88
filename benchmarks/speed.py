"""Throughput of learn2learn's plain loops against the fast path, side by side.

    python benchmarks/speed.py            # or: l2l-recipes speed
Prints both loops' time per iteration, their GFLOP/s next to the float32 matmul rate, the
speed-up and the MAML meta-gradient difference; writes a record to benchmarks/speed/.
"""
import sys

from l2l_recipes.cli import main

if __name__ == "__main__":
    main(["speed", *sys.argv[1:]])
