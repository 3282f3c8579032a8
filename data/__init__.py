"""Corpus preparation and reading: data/corpus.py is the module, data/prepare.py the command."""
