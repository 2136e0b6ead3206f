"""
01_make_sequence.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("01_make_sequence.py: not implemented yet")
