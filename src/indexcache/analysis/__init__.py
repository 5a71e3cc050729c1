"""Analyses of a DSA model's indexers."""
