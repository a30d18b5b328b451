"""mixgf.model and mixgf.collate: config, presets, masking, pooling, NT-Xent, masked-only logits, BERT compatibility."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from mixgf.collate import MLMCollator
from mixgf.model import (
    IGNORE_INDEX, MixGFConfig, MixGFForPretraining, check_token_dataset, demo_config, mean_pool, nt_xent, paper_config,
)
from mixgf.vocab import GeneVocab, default_vocab

VOCAB = GeneVocab(default_vocab().tokens[:300], name="tiny")  # <pad>, <mask> and 298 real ENSG ids
META = {"vocab": VOCAB.identity(), "medians": {"human": {"name": "m", "hash": "0123", "size": 298}}, "max_len": 24}


def tiny_model(**overrides) -> MixGFForPretraining:
    torch.manual_seed(0)
    return MixGFForPretraining(demo_config(META, max_position_embeddings=32, **overrides))


def tiny_batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 25, (n,), generator=g).tolist()
    sequences = [torch.randint(2, len(VOCAB), (length,), generator=g) for length in lengths]
    return MLMCollator(len(VOCAB), mlm_probability=0.3)(sequences, generator=g)


def test_config_validates_and_presets_follow_the_paper():
    with pytest.raises(ValueError, match="pooling"):
        MixGFConfig(pooling="cls")
    with pytest.raises(ValueError, match="vocab_size"):
        MixGFConfig(vocab=META["vocab"], vocab_size=10)
    paper = paper_config(META)
    assert (paper.num_hidden_layers, paper.hidden_size, paper.num_attention_heads) == (6, 256, 4)
    assert paper.intermediate_size == 512
    assert (paper.hidden_act, paper.hidden_dropout_prob, paper.attention_probs_dropout_prob) == ("silu", 0.1, 0.1)
    assert (paper.max_position_embeddings, paper.layer_norm_eps, paper.initializer_range) == (2048, 1e-12, 0.02)
    assert (paper.simcse_tau, paper.simcse_weight, paper.pooling, paper.gather_negatives) == (0.05, 1.0, "first", False)
    assert paper.vocab_size == len(VOCAB) and paper.vocab == VOCAB.identity() and paper.max_len == 24
    assert paper_config(META, simcse_weight=0).simcse_weight == 0  # the MLM-only baselines


def test_check_token_dataset_refuses_another_vocabulary_medians_or_length():
    config = demo_config(META)
    check_token_dataset(config, META)
    other = GeneVocab(default_vocab().tokens[:2] + default_vocab().tokens[3:301], name="other")
    with pytest.raises(ValueError, match="vocabulary 'other'.*tokenize the cells with the model's vocabulary"):
        check_token_dataset(config, {**META, "vocab": other.identity()})
    with pytest.raises(ValueError, match="gene medians"):
        check_token_dataset(config, {**META, "medians": {"human": {"name": "m", "hash": "ffff", "size": 298}}})
    check_token_dataset(config, {**META, "medians": {"mouse": {"name": "m", "hash": "ffff", "size": 298}}})  # unseen species
    with pytest.raises(ValueError, match="max_len=24"):
        check_token_dataset(config, {**META, "max_len": 48})


def test_mlm_masking_statistics():
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(2, len(VOCAB), (int(n),), generator=g) for n in torch.randint(20, 200, (600,), generator=g)]
    batch = MLMCollator(len(VOCAB), pad_to_multiple_of=8)(sequences, generator=g)
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
    assert (ids[to_random] >= 2).all() and (ids[to_random] < len(VOCAB)).all()  # random genes, never <pad> / <mask>


def test_nt_xent_matches_an_explicit_loop():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 7), torch.randn(5, 7), 0.05
    views = [v.tolist() for v in torch.cat([z1, z2])]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    losses = []
    for i, view in enumerate(views):
        positive = (i + 5) % 10
        others = sum(math.exp(cos(view, views[k]) / tau) for k in range(10) if k != i)
        losses.append(-math.log(math.exp(cos(view, views[positive]) / tau) / others))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_first_pooling_is_berts_pooler_and_mean_pooling_skips_padding():
    batch = tiny_batch()
    first, mean = tiny_model(pooling="first").eval(), tiny_model(pooling="mean").eval()
    outputs = first.bert(batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = torch.tanh(first.bert.pooler.dense(outputs.last_hidden_state[:, 0]))
    torch.testing.assert_close(first.pool(outputs, batch["attention_mask"]), expected)

    mask = batch["attention_mask"]
    hidden = outputs.last_hidden_state.masked_fill(~mask.bool().unsqueeze(-1), 1e6)  # padding must not count
    expected = torch.stack([h[m.bool()].mean(0) for h, m in zip(outputs.last_hidden_state, mask)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)
    torch.testing.assert_close(mean.pool(outputs, mask), expected)


def test_logits_at_masked_positions_give_the_full_logits_loss():
    model, batch = tiny_model(simcse_weight=0).eval(), tiny_batch()
    out = model(**batch)
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out.logits, full[batch["labels"] != IGNORE_INDEX])
    torch.testing.assert_close(out.loss_mlm, F.cross_entropy(full.flatten(0, 1), batch["labels"].flatten()))
    assert out.loss_simcse is None and out.loss is out.loss_mlm


@pytest.mark.parametrize("weight, views", [(0.0, 1), (0.5, 2)])
def test_simcse_runs_a_second_dropout_view_only_when_weighted(weight, views):
    model, batch = tiny_model(simcse_weight=weight).train(), tiny_batch()
    seen = []
    model.bert.embeddings.register_forward_hook(lambda module, args, output: seen.append(len(output)))
    out = model(**batch)
    assert seen == [views * len(batch["input_ids"])]
    if weight:
        torch.testing.assert_close(out.loss, out.loss_mlm + weight * out.loss_simcse)
        assert out.loss_simcse > 0  # dropout makes the two views of a cell differ


def test_saved_model_loads_as_bert_for_masked_lm(tmp_path):
    model, batch = tiny_model().eval(), tiny_batch()
    model.save_pretrained(tmp_path)
    bert = BertForMaskedLM.from_pretrained(tmp_path).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(bert(**inputs).logits, model(**inputs).logits)
        reloaded = MixGFForPretraining.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    assert reloaded.config.vocab == VOCAB.identity() and reloaded.config.pooling == "first"


def test_import_bert_checkpoint_moves_gene_rows_to_the_unified_ids(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from mixgf.model import import_bert_checkpoint

    genes = default_vocab().tokens[2:40]
    source_vocab = GeneVocab(("<pad>", "<mask>", *genes[::-1]), name="checkpoint-order")  # its own id order
    target_vocab = GeneVocab(("<pad>", "<mask>", *genes, *default_vocab().tokens[-5:]), name="target")
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(source_vocab), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=16))
    bert.save_pretrained(tmp_path / "ckpt")
    bert.eval()
    meta = {"vocab": target_vocab.identity(), "medians": {}, "max_len": 16}
    model = import_bert_checkpoint(tmp_path / "ckpt", source_vocab, target_vocab, meta).eval()
    cells = [list(genes[:10]), list(genes[5:15])]
    with torch.no_grad():
        ours = model(torch.tensor([target_vocab.ids(c) for c in cells])).logits
        theirs = bert(torch.tensor([source_vocab.ids(c) for c in cells])).logits
    shared = target_vocab.ids(source_vocab.tokens)
    assert torch.allclose(ours[..., torch.from_numpy(shared)], theirs, atol=1e-5)
    assert model.config.simcse_weight == 0 and model.config.vocab == target_vocab.identity()
