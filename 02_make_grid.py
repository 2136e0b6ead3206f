"""
02_make_grid.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("02_make_grid.py: not implemented yet")
