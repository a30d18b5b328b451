"""mixgf.model: config, presets, pooling, masked-only logits, the loss terms, BERT compatibility."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from mixgf.checkpoint import check_token_dataset
from mixgf.collate import MLMCollator
from mixgf.model import IGNORE_INDEX, MixGFConfig, MixGFForPretraining, demo_config, paper_config
from mixgf.pooling import mean_pool
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
    return MLMCollator.for_vocab(VOCAB, ["human"], mlm_probability=0.3)(sequences, [0] * n, range(n))


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


LOAD_WITHOUT_MIXGF = """
import json, sys
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification
config = AutoConfig.from_pretrained(sys.argv[1])
_, mlm = AutoModelForMaskedLM.from_pretrained(sys.argv[1], output_loading_info=True)
_, clf = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=3, output_loading_info=True)
print(json.dumps({"type": type(config).__name__, "simcse_tau": config.simcse_tau, "mixgf": "mixgf" in sys.modules,
                  "mlm": {k: sorted(v) for k, v in mlm.items()}, "clf": {k: sorted(v) for k, v in clf.items()}}))
"""


def test_saved_model_is_a_plain_bert_checkpoint_for_any_hugging_face_user(tmp_path):
    import json
    import subprocess
    import sys

    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    run = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MIXGF, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert loaded["type"] == "BertConfig" and loaded["simcse_tau"] == 0.05 and not loaded["mixgf"]
    assert loaded["mlm"] == {"missing_keys": [], "unexpected_keys": ["bert.pooler.dense.bias", "bert.pooler.dense.weight"],
                             "mismatched_keys": [], "error_msgs": []}  # BertForMaskedLM has no pooler; nothing lacks
    assert loaded["clf"]["missing_keys"] == ["classifier.bias", "classifier.weight"]  # the new head, nothing else
    assert loaded["clf"]["unexpected_keys"] == sorted(
        ["cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
         "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"])  # the MLM head


@pytest.mark.parametrize("name", ["nt_xent", "eq3"])
def test_the_configured_simcse_loss_is_the_one_computed(name):
    from mixgf import simcse

    with pytest.raises(ValueError, match="simcse_loss must be one of"):
        MixGFConfig(simcse_loss="infonce")
    model, batch = tiny_model(simcse_loss=name).eval(), tiny_batch()  # eval: no dropout, both views equal
    out = model(**batch)
    z = model.pool(model.bert(batch["input_ids"], attention_mask=batch["attention_mask"]), batch["attention_mask"])
    torch.testing.assert_close(out.loss_simcse, simcse.LOSSES[name](z, z, 0.05))
    assert set(out.diagnostics) == {"simcse_pos_cos", "simcse_neg_cos", "simcse_accuracy"}
    torch.testing.assert_close(out.diagnostics["simcse_pos_cos"], torch.tensor(1.0))


def ortholog_batch(n: int = 6) -> dict[str, torch.Tensor]:
    """A tiny batch with its cells "rendered in the other species": here other genes of the tiny vocabulary, the last
    cell without any (it must be left out of the cross-species term)."""
    batch = tiny_batch(n)
    g = torch.Generator().manual_seed(1)
    rendered = [torch.randint(2, len(VOCAB), (length,), generator=g) for length in [5, 9, 3, 12, 7]] + [torch.zeros(0)]
    from mixgf.padding import pad_batch
    batch["ortholog_input_ids"], batch["ortholog_attention_mask"] = pad_batch(rendered)
    return batch


def test_the_cross_species_term_is_infonce_between_a_cell_and_its_rendering_in_the_other_species():
    from mixgf import simcse

    with pytest.raises(ValueError, match="ortholog_loss must be one of"):
        MixGFConfig(ortholog_loss="triplet")
    with pytest.raises(ValueError, match="ortholog_tau"):
        MixGFConfig(ortholog_tau=0.0)
    batch = ortholog_batch()
    model = tiny_model(ortholog_weight=0.5, ortholog_tau=0.1).eval()  # eval: no dropout, the views are exact
    out = model(**batch)
    own = model.bert(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    other = model.bert(batch["ortholog_input_ids"], attention_mask=batch["ortholog_attention_mask"]).last_hidden_state
    z = mean_pool(own[:5], batch["attention_mask"][:5])
    z_other = mean_pool(other[:5], batch["ortholog_attention_mask"][:5])
    torch.testing.assert_close(out.loss_ortholog, simcse.nt_xent(z, z_other, 0.1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.loss_mlm + out.loss_simcse + 0.5 * out.loss_ortholog)
    assert {"ortholog_pos_cos", "ortholog_neg_cos", "ortholog_accuracy"} <= set(out.diagnostics)
    del batch["ortholog_input_ids"]
    with pytest.raises(ValueError, match="ortholog_input_ids"):
        model(**batch)
    assert tiny_model().eval()(**batch).loss_ortholog is None  # weight 0, the paper: no term, no rendering needed


def test_the_cross_species_term_trains_the_encoder():
    """Unlike the authors' later code (computed without gradients), the term's gradient reaches the gene embeddings,
    and a few steps on it alone pull a cell's two renderings together."""
    batch = ortholog_batch()
    model = tiny_model(ortholog_weight=1.0, simcse_weight=0.0, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(**batch)
        optimizer.zero_grad()
        out.loss_ortholog.backward()
        assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.loss_ortholog.item())
    assert losses[-1] < 0.5 * losses[0], losses
