"""Mix-Geneformer: one transformer pretrained on human and mouse single-cell RNA-seq.

Modules (import what you need; importing ``mixgf`` itself loads nothing heavy):
``vocab`` gene vocabularies and medians, ``readers`` chunked count-file readers, ``tokenize`` rank-value
encoding, ``medians`` streaming gene medians.
"""

__version__ = "0.1.0"
