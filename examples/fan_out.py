"""Fan out to N children (N from the command line, default 3) and collect their results.

Usage: python examples/fan_out.py [N]
Every child is reaped, results come back in order, and a failing child is
reported with its traceback instead of being lost.
"""
import os
import sys

import fastfork


def work(i):
    return f"child {i} ran as pid {os.getpid()}"


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for line in fastfork.map(work, range(n)):
        print(line)
    print(f"parent {os.getpid()}: all {n} children reaped")
