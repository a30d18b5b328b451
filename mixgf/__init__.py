"""Mix-Geneformer: one transformer pretrained on human and mouse single-cell RNA-seq.

Import what you need; importing ``mixgf`` itself loads nothing heavy. One module per concept:
``vocab`` gene vocabularies, medians, symbols, orthologs; ``readers`` chunked count-file readers; ``tokenize``
rank-value encoding; ``tokens`` token datasets on disk; ``medians`` streaming gene medians; ``corpus`` merging
corpora across vocabularies; ``demo`` the embedded demo atlas; ``model`` BERT + MLM + SimCSE; ``collate`` MLM
masking and length-grouped batches; ``pretrain`` the training loop; ``settings`` threads and progress bars;
``io`` atomic outputs.
"""

__version__ = "0.1.0"
