"""mixgf.checkpoint and mixgf.encoder: a saved BERT read without transformers' model classes equals BertModel."""

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from mixgf.checkpoint import read_config, read_weights
from mixgf.encoder import load_encoder
from mixgf.vocab import GeneVocab


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_an_old_style_checkpoint_encodes_as_bert_model_does(tmp_path, act):
    """pytorch_model.bin with a ``bert.`` prefix and LayerNorm gamma / beta (as old Geneformer files): every layer's
    hidden states equal BertModel's, padding masked, with biases that are not 0."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=20, hidden_act=act,
                        initializer_range=0.3)  # activations of order 1, where the forms of gelu differ
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # BERT starts its biases at 0; the encoder folds key and value biases away, so test them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert not (tmp_path / "model.safetensors").exists()
    assert all(not k.startswith(("bert.", "cls.")) and "gamma" not in k for k in read_weights(tmp_path))

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model.bert(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in (0, -1, -3):
        got = load_encoder(tmp_path, read_config(tmp_path), layer, torch.device("cpu"))(ids, mask)
        torch.testing.assert_close(got[mask.bool()], expected[3 + layer][mask.bool()], atol=2e-6, rtol=1e-5)


def test_config_identity_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3, "num_hidden_layers": 1}))
    config = read_config(tmp_path)
    assert (config.vocab, config.medians, config.max_len, config.layer_norm_eps) == (None, None, None, 1e-12)
    vocab = GeneVocab(("<pad>", "<mask>", "ENSG01"))
    assert read_config(tmp_path, vocab).vocab == vocab.identity()
    with pytest.raises(ValueError, match="the model has 3 tokens but vocabulary"):
        read_config(tmp_path, GeneVocab(("<pad>", "<mask>")))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        read_weights(tmp_path)
    with pytest.raises(ValueError, match="emb_layer must be in"):
        load_encoder(tmp_path, config, -2, torch.device("cpu"))


@pytest.mark.parametrize("threads, workers, each", [(1, 1, 1), (2, 2, 1), (8, 4, 2)])
def test_map_batches_runs_side_by_side_in_order_and_restores_the_threads(threads, workers, each):
    """Batches run in up to 4 worker threads sharing the torch threads (one thread alone: in turn, in the caller),
    the results come back in the order of the batches, and the caller's torch thread count is what it was."""
    import threading
    import time

    from mixgf.encoder import map_batches

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seen = []

        def work(i):
            seen.append((threading.get_ident(), torch.get_num_threads()))
            time.sleep(0.01)  # busy, so the pool starts another worker for the next batch
            return i * i

        assert list(map_batches(work, iter(range(20)), torch.device("cpu"))) == [i * i for i in range(20)]
        assert torch.get_num_threads() == threads
        idents = {t for t, _ in seen}
        assert {n for _, n in seen} == {each if workers > 1 else threads}
        if workers == 1:
            assert idents == {threading.get_ident()}
        else:
            assert threading.get_ident() not in idents and 1 < len(idents) <= workers
    finally:
        torch.set_num_threads(before)
