"""
04_gen_pairs.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("04_gen_pairs.py: not implemented yet")
