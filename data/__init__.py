"""Corpus preparation: data/<name>/prepare.py scripts and the helpers they share (prepare_utils.py)."""
