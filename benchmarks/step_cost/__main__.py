"""`python -m benchmarks.step_cost`."""

from benchmarks.step_cost.cli import main

if __name__ == "__main__":
  main()
