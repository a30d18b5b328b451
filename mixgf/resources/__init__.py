"""Bundled, plain-text gene resources (see PROVENANCE.md); rebuilt by ``python -m mixgf.resources.build``."""
