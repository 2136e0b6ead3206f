"""
05_post_select.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("05_post_select.py: not implemented yet")
