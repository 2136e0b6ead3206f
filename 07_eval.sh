#!/usr/bin/env bash
# 07_eval.sh — not implemented yet (see the project's open issues).
echo "07_eval.sh: not implemented yet" >&2
exit 1
