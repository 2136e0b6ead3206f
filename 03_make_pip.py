"""
03_make_pip.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("03_make_pip.py: not implemented yet")
