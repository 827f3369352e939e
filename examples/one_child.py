"""Fork one child and wait for it, with fastfork.

The child cannot fall through into the parent's code: start() ends it in
_exit whatever the function does, and its return value comes back.
"""
import os

import fastfork


def child_work():
    print(f"child {os.getpid()}: hello from the child")
    return os.getpid()


if __name__ == "__main__":
    child = fastfork.start(child_work)
    print(f"parent {os.getpid()}: child {child.pid} returned {child.result()}, "
          f"exit code {child.returncode}")
