"""mixgf.collate: MLM masking (recipe, species-correct replacements, a target in every cell), padding, batch order."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from mixgf.collate import MLMCollator, PretrainBatches, length_grouped_batches
from mixgf.padding import pad_batch
from mixgf.model import IGNORE_INDEX
from mixgf.vocab import default_vocab

VOCAB = default_vocab()
HUMAN, MOUSE = VOCAB.species_ids("human"), VOCAB.species_ids("mouse")


def cells(n: int, genes: np.ndarray, seed: int = 0, low: int = 20, high: int = 200) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.choice(genes, rng.integers(low, high), replace=False)) for _ in range(n)]


def test_mlm_masking_statistics():
    sequences = cells(600, HUMAN)
    batch = MLMCollator.for_vocab(VOCAB, ["human"], pad_to_multiple_of=8)(sequences, [0] * 600, range(600))
    longest = max(len(s) for s in sequences)
    assert batch["input_ids"].shape[1] == 8 * math.ceil(longest / 8)  # padded per batch, to a multiple of 8
    original = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    original = F.pad(original, (0, batch["input_ids"].shape[1] - longest))  # as wide as the batch
    real = batch["attention_mask"].bool()
    chosen = batch["labels"] != IGNORE_INDEX

    assert (real == (original != VOCAB.pad_id)).all() and (batch["input_ids"][~real] == VOCAB.pad_id).all()
    assert not (chosen & ~real).any()  # padding is never masked
    assert (batch["labels"][chosen] == original[chosen]).all() and (batch["input_ids"][~chosen] == original[~chosen]).all()
    assert abs(chosen.sum() / real.sum() - 0.15) < 0.01

    ids, labels = batch["input_ids"][chosen], batch["labels"][chosen]
    to_mask, unchanged = ids == VOCAB.mask_id, ids == labels
    to_random = ~to_mask & ~unchanged
    assert abs(to_mask.float().mean() - 0.8) < 0.02
    assert abs(to_random.float().mean() - 0.1) < 0.015 and abs(unchanged.float().mean() - 0.1) < 0.015


def test_random_replacements_are_genes_of_the_cells_own_species():
    sequences = cells(300, HUMAN) + cells(300, MOUSE, seed=1)
    species = [0] * 300 + [1] * 300
    collate = MLMCollator.for_vocab(VOCAB, ["human", "mouse"])
    batch = collate(sequences, species, range(600))
    labels, ids = batch["labels"], batch["input_ids"]
    replaced = (labels != IGNORE_INDEX) & (ids != VOCAB.mask_id) & (ids != labels)
    human_rows = torch.arange(600)[:, None] < 300
    assert (replaced & human_rows).sum() > 100 and (replaced & ~human_rows).sum() > 100
    assert np.isin(ids[replaced & human_rows].numpy(), HUMAN).all()  # a human cell gets human genes only
    assert np.isin(ids[replaced & ~human_rows].numpy(), MOUSE).all()
    # draws cover the species' genes, not only the genes seen in the batch
    assert not np.isin(ids[replaced & ~human_rows].numpy(), torch.cat(sequences[300:]).numpy()).all()


def test_every_cell_gets_a_masked_gene_and_masks_do_not_depend_on_the_batch():
    one_gene = [torch.tensor([int(g)]) for g in HUMAN[:200]]  # 85% of these would carry no target by chance
    collate = MLMCollator.for_vocab(VOCAB, ["human"])
    batch = collate(one_gene, [0] * 200, range(200))
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 1).all()

    sequences = cells(12, HUMAN)
    together = collate(sequences, [0] * 12, range(12))
    alone = collate(sequences[5:6], [0], [5])  # the same cell and seed in a batch of its own, padded less
    width = alone["input_ids"].shape[1]
    assert torch.equal(together["input_ids"][5, :width], alone["input_ids"][0])
    assert torch.equal(together["labels"][5, :width], alone["labels"][0])


def test_padding_never_exceeds_the_model_positions():
    input_ids, mask = pad_batch([list(range(2, 252)), [5, 6]], pad_to_multiple_of=8, max_length=250)
    assert input_ids.shape == (2, 250) and mask.sum().item() == 252
    assert pad_batch([[2, 3, 4]], pad_to_multiple_of=8, max_length=250)[0].shape == (1, 8)


def test_length_grouped_batches_cover_the_epoch_and_group_lengths():
    lengths = np.random.default_rng(0).integers(10, 2049, 1003)
    batches = length_grouped_batches(lengths, 8, megabatch=10, seed=1)
    assert batches.shape == (125, 8) and len(np.unique(batches)) == 1000  # the last partial batch is dropped
    grouped_pad = np.mean(lengths[batches].max(1) - lengths[batches].mean(1))
    random = length_grouped_batches(lengths, 8, 1, seed=1)
    assert grouped_pad < np.mean(lengths[random].max(1) - lengths[random].mean(1)) / 5
    assert np.array_equal(batches, length_grouped_batches(lengths, 8, megabatch=10, seed=1))
    assert not np.array_equal(batches, length_grouped_batches(lengths, 8, megabatch=10, seed=2))


def test_two_processes_take_the_cells_and_masks_of_one_process_with_twice_the_batch():
    sequences = cells(100, HUMAN, low=5, high=40)
    tokens = {"input_ids": sequences}

    class Rows:  # what the token dataset's indexing gives: {"input_ids": [cells]}
        def __getitem__(self, rows):
            return {"input_ids": [tokens["input_ids"][r] for r in rows]}

    lengths, species = np.array([len(s) for s in sequences]), np.zeros(100, dtype=np.int8)
    collate = MLMCollator.for_vocab(VOCAB, ["human"])
    single = PretrainBatches(Rows(), lengths, species, collate, 8, megabatch=3, seed=7)
    ranks = [PretrainBatches(Rows(), lengths, species, collate, 4, megabatch=3, seed=7, rank=r, world_size=2)
             for r in range(2)]
    assert len(single) == len(ranks[0]) == 12
    for step in (0, 5, 11, 12, 30):  # steps 12 and 30 lie in epochs 1 and 2, reshuffled
        whole = single[step]
        for r, rank in enumerate(ranks):
            part = rank[step]
            width = part["input_ids"].shape[1]
            for key in ("input_ids", "labels"):
                assert torch.equal(part[key], whole[key][4 * r : 4 * r + 4, :width]), (step, r, key)
    assert not np.array_equal(single.cells(0)[1], single.cells(12)[1])


def test_cells_are_rendered_in_the_other_species_tokens_in_rank_order():
    from mixgf.vocab import orthologs, subset_vocab

    table = orthologs()
    pairs = table.iloc[:3]
    alone = [next(t for t in VOCAB.tokens[2:] if t.startswith(p) and t not in set(table[c]))  # no one-to-one partner
             for p, c in (("ENSMUSG", "mouse_id"), ("ENSG", "human_id"))]
    vocab = subset_vocab(VOCAB, [*pairs.human_id, *pairs.mouse_id, *alone])
    h, m = vocab.ids(pairs.human_id), vocab.ids(pairs.mouse_id)
    mouse_only, human_only = vocab.ids(alone)
    collate = MLMCollator.for_vocab(vocab, ["human", "mouse"], orthologs=True)
    batch = collate([[m[2], mouse_only, m[0]], [h[1], human_only, h[0], h[2]], [mouse_only]], [1, 0, 1], [0, 1, 2])
    assert batch["ortholog_input_ids"].tolist() == [[h[2], h[0], 0], [m[1], m[0], m[2]], [0, 0, 0]]
    assert batch["ortholog_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert "ortholog_input_ids" not in MLMCollator.for_vocab(vocab, ["human"])([[h[0]]], [0], [0])


def test_balanced_epochs_hold_as_many_cells_of_each_species_as_the_largest():
    from mixgf.collate import balanced_rows

    species = np.r_[np.zeros(30, np.int8), np.ones(7, np.int8)]
    rows = balanced_rows(species, seed=0)
    counts = np.bincount(rows, minlength=37)
    assert (species[rows] == 0).sum() == (species[rows] == 1).sum() == 30
    assert (counts[:30] == 1).all() and sorted(set(counts[30:])) == [4, 5] and counts[30:].sum() == 30
    assert not np.array_equal(rows, balanced_rows(species, seed=1))

    sequences = cells(37, HUMAN, low=30, high=40)  # long enough that two masks of one cell rarely agree

    class Rows:
        def __getitem__(self, rows):
            return {"input_ids": [sequences[r] for r in rows]}

    lengths = np.array([len(s) for s in sequences])
    batches = PretrainBatches(Rows(), lengths, species, MLMCollator.for_vocab(VOCAB, ["human", "human"]), 6,
                              megabatch=2, seed=3, balance_species=True)
    assert len(batches) == 10  # 60 cells an epoch, not 37
    epoch_rows = np.concatenate([batches.cells(step)[1] for step in range(10)])
    assert (species[epoch_rows] == 1).sum() == 30 == (species[epoch_rows] == 0).sum()
    twice = [step for step in range(10) if len(set(batches.cells(step)[1])) < 6]  # a cell drawn twice in a batch
    for step in twice:  # is masked differently each time
        rows, labels = batches.cells(step)[1], batches[step]["labels"]
        first, again = [np.flatnonzero(rows == r) for r in rows if (rows == r).sum() > 1][0][:2]
        assert not torch.equal(labels[first], labels[again])
