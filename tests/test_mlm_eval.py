"""mixgf.mlm_eval: gene frequencies by hand, and a model that is the unigram predictor scores exactly its loss."""

import datasets
import numpy as np
import pytest
import torch

from mixgf.collate import MLMCollator, cell_seed
from mixgf.mlm_eval import evaluate_mlm, gene_frequencies
from mixgf.model import IGNORE_INDEX, MixGFForPretraining, demo_config
from mixgf.vocab import GeneVocab, default_vocab

VOCAB = GeneVocab(default_vocab().tokens[:12], name="tiny")  # <pad>, <mask> and 10 human genes
META = {"vocab": VOCAB.identity(), "medians": None, "max_len": 16}


def cells(rows) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})


def test_gene_frequencies_count_tokens_with_add_one_smoothing():
    p = gene_frequencies(cells([[2, 3, 4], [3, 4], [4]]), len(VOCAB), chunk=2)
    counts = np.array([0, 0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0]) + np.r_[0, 0, np.ones(10)]
    assert np.allclose(p, counts / counts.sum())
    assert p[:2].sum() == 0
    assert np.allclose(gene_frequencies(cells([[2, 3, 4], [3, 4], [4]]), len(VOCAB), max_cells=2),
                       (np.r_[0, 0, 1, 1, 2, np.zeros(7)] + np.r_[0, 0, np.ones(10)]) / 14)


def test_a_unigram_model_gains_nothing_and_the_unigram_loss_is_minus_log_p():
    rng = np.random.default_rng(0)
    rows = [rng.permutation(np.arange(2, 12))[: rng.integers(3, 11)].tolist() for _ in range(40)]
    dataset = cells(rows)
    p = gene_frequencies(dataset, len(VOCAB))
    torch.manual_seed(0)
    model = MixGFForPretraining(demo_config(META, max_position_embeddings=16, simcse_weight=0.0)).eval()
    with torch.no_grad():  # logits = log p at every position, whatever the input: the unigram predictor itself
        model.cls.predictions.decoder.weight.zero_()
        model.cls.predictions.bias.copy_(torch.from_numpy(np.log(np.where(p > 0, p, 1e-30))))
    r = evaluate_mlm(model, dataset, VOCAB, p, species="human", batch_size=7, seed=3, n_boot=200)

    collate = MLMCollator.for_vocab(VOCAB, ["human"], max_length=16)  # the same masks, cell by cell
    labels = [collate([row], [0], [cell_seed(3, 0, c)])["labels"][0] for c, row in enumerate(rows)]
    targets = torch.cat([l[l != IGNORE_INDEX] for l in labels]).numpy()
    assert r["cells"] == 40 and r["masked_genes"] == len(targets)
    assert r["unigram_loss"] == pytest.approx(-np.log(p[targets]).mean(), rel=1e-9)
    assert r["mlm_loss"] == pytest.approx(r["unigram_loss"], abs=1e-5)
    assert abs(r["gain"]) < 1e-5 and r["gain_low"] <= r["gain"] <= r["gain_high"]
    assert r["accuracy"] == pytest.approx(r["unigram_accuracy"])


def test_an_untrained_model_is_worse_than_the_unigram_predictor():
    rows = [[2, 2, 2, 3, 4, 5, 6, 7][: 4 + i % 5] for i in range(30)]  # gene 2 dominates: the unigram is good
    dataset = cells(rows)
    torch.manual_seed(0)
    model = MixGFForPretraining(demo_config(META, max_position_embeddings=16, simcse_weight=0.0))
    r = evaluate_mlm(model, dataset, VOCAB, gene_frequencies(dataset, len(VOCAB)), species="human", max_cells=20,
                     n_boot=200)
    assert r["cells"] == 20
    assert r["gain_high"] < 0 and r["mlm_loss"] == pytest.approx(np.log(len(VOCAB)), abs=0.3)
