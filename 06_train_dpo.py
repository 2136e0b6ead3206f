"""
06_train_dpo.py — not implemented yet (see the project's open issues).
"""
import sys

if __name__ == "__main__":
    sys.exit("06_train_dpo.py: not implemented yet")
