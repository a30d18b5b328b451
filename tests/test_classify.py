"""mixgf.classify and `mixgf finetune` / `mixgf predict`: the paper's split, fine-tuning on real cells, prediction.

The real cells are scanpy's bundled pbmc68k_reduced (700 PBMCs, 10 FACS-sorted types; counts recovered by
mixgf.demo), tokenized with a vocabulary of their own 690 genes so that a tiny BERT trains in seconds on 2 cores
(with the 82,606-gene vocabulary AdamW's update of the embedding matrix alone takes 4x longer than the model).
"""

import json
import shutil
import subprocess
import sys
import warnings

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from mixgf.classify import FinetuneConfig, finetune, predict, split_cells
from mixgf.cli import main
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab, default_medians, default_vocab, geneformer_v1_vocab

MAX_LEN = 64
FAST = dict(lr=3e-3, epochs=6)  # a tiny random "pretrained" model needs a larger LR than the paper's 5e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and threads fighting other jobs for 2 cores slow these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory):
    """(token dataset path, its vocabulary): 700 real PBMCs, max_len 64, obs column cell_type."""
    from mixgf.demo import pbmc68k_immune
    from mixgf.tokenize import tokenize_files

    root = tmp_path_factory.mktemp("pbmc")
    cells = pbmc68k_immune()
    cells.write_h5ad(root / "pbmc.h5ad")
    known = set(cells.var_names) & set(default_medians("human").values.index)
    vocab = GeneVocab(default_vocab().tokens[:2] + tuple(g for g in default_vocab().tokens if g in known), name="pbmc")
    tokenize_files([root / "pbmc.h5ad"], root / "tokens", species="human", vocab=vocab, obs_keys=["cell_type"],
                   max_len=MAX_LEN, progress=False)
    return root / "tokens", vocab


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pbmc):
    """A tiny checkpoint in the shape of ours: a BERT config with vocab / medians / max_len, BertForMaskedLM weights."""
    path, vocab = pbmc
    _, meta = load_tokens(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LEN, vocab=vocab.identity(),
                        medians=meta["medians"], max_len=MAX_LEN)
    out = tmp_path_factory.mktemp("pretrained")
    BertForMaskedLM(config).save_pretrained(out)
    vocab.write(out / "vocab.tsv")
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, pbmc, pretrained):
    dataset, meta = load_tokens(pbmc[0])
    out = tmp_path_factory.mktemp("clf") / "classifier"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BertForMaskedLM checkpoint has no pooler: warned, tested elsewhere
        return finetune(pretrained, dataset, meta, "cell_type", FinetuneConfig(**FAST), out_dir=out)


# ---------------------------------------------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------------------------------------------

def toy_labels() -> np.ndarray:
    """20 cells: A x 10, B x 5, C x 2, D x 1 (exactly 5%), E x 2."""
    labels = np.array(["A"] * 10 + ["B"] * 5 + ["C", "C"] + ["D"] + ["E", "E"])
    labels[[13, 16]], labels[15] = "C", "B"  # C at rows 13 and 16, B at rows 10, 11, 12, 14, 15
    return labels


def test_split_rule_by_hand():
    labels = toy_labels()
    split = split_cells(labels, min_fraction=0.05, val_fraction=0.25, seed=42)
    # D holds 1/20 = 5% <= 5%: dropped; C holds 10% and stays. The 19 kept rows are 0..16, 18, 19;
    # default_rng(42).permutation(19) = [14, 9, 17, 7, 12, 10, 6, 18, 3, 0, 15, 5, 11, 2, 4, 16, 1, 13, 8] puts them in
    # the order 14 9 18 7 12 10 6 19 3 0 15 5 11 2 4 | 16 1 13 8, cut after round(19 x 0.8) = 15 rows.
    assert split.dropped_types == {"D": 1}
    train80 = [14, 9, 18, 7, 12, 10, 6, 19, 3, 0, 15, 5, 11, 2, 4]
    # test rows 16 and 13 are C, which no training row holds: dropped
    assert split.test.tolist() == [1, 8] and split.n_unseen_test == 2
    assert split.labels == ("A", "B", "E")
    assert sorted(np.concatenate([split.train, split.val]).tolist()) == sorted(train80)
    # validation: floor(0.25 x count + 0.5) of each type, never a type's last cell: A 8 -> 2, B 5 -> 1, E 2 -> 1
    assert sorted(labels[split.val].tolist()) == ["A", "A", "B", "E"]
    assert not set(split.val) & set(split.train) and not set(split.val) & set(split.test)
    again = split_cells(labels, min_fraction=0.05, val_fraction=0.25, seed=42)
    assert again.to_json() == split.to_json()  # deterministic
    # the boundary the other way: 1 cell of 199 is 0.503% > 0.5%, so it stays
    assert split_cells(["x"] * 198 + ["y"]).dropped_types == {}
    assert split_cells(["x"] * 199 + ["y"]).dropped_types == {"y": 1}  # 1/200 = 0.5% exactly: dropped


def test_split_is_the_authors_datasets_code():
    """Geneformer's / Mix-Geneformer's notebook, verbatim in effect: filter rare types, shuffle(seed=42), 80/20 with
    round(), drop test labels unseen in training; our train + val must be their train, our test their test."""
    rng = np.random.default_rng(5)
    labels = rng.choice([f"t{i}" for i in range(12)], 997, p=np.r_[np.full(9, 0.11), 0.005, 0.003, 0.002])
    ds = datasets.Dataset.from_dict({"cell_type": labels.tolist(), "row": list(range(len(labels)))})
    counts = pd.Series(labels).value_counts()
    keep = [k for k, v in counts.items() if v > 0.005 * len(labels)]
    shuffled = ds.filter(lambda e: e["cell_type"] in keep).shuffle(seed=42)
    n_train = round(len(shuffled) * 0.8)
    train = shuffled.select(range(n_train))
    trained = set(train["cell_type"])
    test = shuffled.select(range(n_train, len(shuffled))).filter(lambda e: e["cell_type"] in trained)

    split = split_cells(labels)
    assert sorted(np.concatenate([split.train, split.val]).tolist()) == sorted(train["row"])
    assert split.test.tolist() == list(test["row"])  # same cells, same order
    assert set(split.dropped_types) == set(counts.index) - set(keep) and split.dropped_types


def test_validation_is_stratified_and_survives_tiny_classes():
    labels = np.array(["big"] * 500 + ["mid"] * 100 + ["one"] + ["two"] * 2)
    split = split_cells(labels, min_fraction=0, val_fraction=0.1)
    val = pd.Series(labels[split.val]).value_counts()
    train = pd.Series(labels[np.concatenate([split.train, split.val])]).value_counts()
    assert (val / train).drop(["one", "two"], errors="ignore").between(0.08, 0.12).all()
    assert "one" not in val  # a type's last training cell stays in training
    parts = np.concatenate([split.train, split.val, split.test])
    assert len(set(parts)) == len(parts)  # disjoint
    assert len(split_cells(labels, val_fraction=0).val) == 0
    # half to validation, with types of 1 to 3 cells: every class keeps a training cell
    few = np.repeat([f"t{i}" for i in range(30)], np.arange(30) % 3 + 1)
    split = split_cells(few, min_fraction=0, val_fraction=0.5)
    assert set(few[split.train]) == set(split.labels) and len(split.val) > 0


def test_predict_matches_cell_by_cell(classifier, pbmc):
    """Cells of different lengths, batched longest first and padded, come back in dataset order with the
    probabilities of an unpadded forward pass of each cell alone."""
    from transformers import AutoModelForSequenceClassification

    dataset, meta = load_tokens(pbmc[0])
    cells = dataset.select(range(40)).map(
        lambda e, i: {"input_ids": e["input_ids"][: 5 + (17 * i) % 60], "length": 5 + (17 * i) % 60},
        with_indices=True, keep_in_memory=True)
    frame = predict(classifier.out_dir, cells, meta, batch_size=7, dtype="float32")  # float32 on a GPU too
    model = AutoModelForSequenceClassification.from_pretrained(classifier.out_dir).eval()
    with torch.no_grad():
        probs = [torch.softmax(model(input_ids=torch.tensor([c])).logits[0], -1) for c in cells["input_ids"]]
    assert frame.cell_index.tolist() == list(range(40)) and frame.cell_id.tolist() == cells["cell_id"]
    assert frame.predicted.tolist() == [model.config.id2label[int(p.argmax())] for p in probs]
    assert frame.probability.to_numpy() == pytest.approx([float(p.max()) for p in probs], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning and prediction on real cells
# ---------------------------------------------------------------------------------------------------------------

def test_finetuning_learns_the_cell_types(classifier, pbmc, pretrained):
    dataset, _ = load_tokens(pbmc[0])
    labels = np.asarray(dataset["cell_type"])
    r, m = classifier, classifier.metrics
    majority = pd.Series(labels[r.split.test]).value_counts(normalize=True).iloc[0]
    # seen (CPU, torch 2.13): the majority class is 0.400 of the 140 test cells; test accuracy by epoch 0.41, 0.48,
    # 0.61, 0.65, 0.67, 0.66, val-selected epoch 5 (val 0.571, test 0.671). With shuffled labels the same run stays
    # at its split's majority share (0.314 every epoch), so this margin fails if training learns nothing.
    assert m["test_accuracy"] >= majority + 0.15, (m, majority)
    assert len(r.history) == 6 and r.history[-1]["train_loss"] < 0.75 * r.history[0]["train_loss"]
    val = [h["val_accuracy"] for h in r.history]
    assert r.best_epoch == 1 + int(np.argmax(val)) and m["val_accuracy"] == max(val)
    assert m["test_accuracy_best_on_test"] == max(h["test_accuracy"] for h in r.history) >= m["test_accuracy"]
    assert np.mean(r.test_predictions == labels[r.split.test]) == pytest.approx(m["test_accuracy"])
    assert (m["n_train"], m["n_val"], m["n_test"]) == (504, 56, 140)  # 700 x 0.8 = 560 = 504 + 56; nothing dropped

    saved = json.loads((r.out_dir / "split.json").read_text())
    assert saved["label"] == "cell_type" and saved["test"] == r.split.test.tolist()
    assert saved["dataset_fingerprint"] == dataset._fingerprint and saved["labels"] == list(r.split.labels)
    assert (r.out_dir / "vocab.tsv").read_text() == (pretrained / "vocab.tsv").read_text()
    history = json.loads((r.out_dir / "history.json").read_text())
    assert history["metrics"]["best_epoch"] == r.best_epoch and len(history["history"]) == 6


def test_saved_classifier_loads_without_mixgf(classifier, pbmc, tmp_path):
    dataset, meta = load_tokens(pbmc[0])
    cell = dataset[0]["input_ids"]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        "model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    p = torch.softmax(model(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits, -1)[0]\n"
        "assert not any(m.split('.')[0] == 'mixgf' for m in sys.modules), 'mixgf was imported'\n"
        "print(json.dumps({'class': type(model).__name__, 'labels': model.config.id2label, 'p': p.tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(classifier.out_dir), json.dumps(cell)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["class"] == "BertForSequenceClassification"
    assert list(out["labels"].values()) == list(classifier.split.labels)
    first = predict(classifier.out_dir, dataset.select([0]), meta, dtype="float32").iloc[0]
    assert out["labels"][str(int(np.argmax(out["p"])))] == first["predicted"]
    assert max(out["p"]) == pytest.approx(first["probability"], abs=1e-4)


def test_predict_cli_writes_csv_and_scores(classifier, pbmc, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(classifier.out_dir), str(pbmc[0]), "--out", str(out), "--label", "cell_type"]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["cell_index", "species", "cell_id", "cell_type", "predicted", "probability"]
    assert len(frame) == 700 and frame.cell_index.tolist() == list(range(700))
    assert frame.probability.between(1 / 10, 1).all() and set(frame.predicted) <= set(classifier.split.labels)
    test = frame.iloc[classifier.split.test]  # the same cells and weights give the fine-tuning's test predictions
    same = (test.predicted.to_numpy() == classifier.test_predictions).mean()
    assert same == 1 if not torch.cuda.is_available() else same > 0.97  # bf16 on a GPU: other batches, rare flips

    scores = json.loads((tmp_path / "predictions.json").read_text())
    accuracy = (frame.predicted == frame.cell_type).mean()
    assert scores["accuracy"]["estimate"] == pytest.approx(accuracy) and scores["n_cells"] == 700
    low, high = scores["accuracy"]["ci95"]
    assert low < accuracy < high and scores["macro_f1"]["ci95"][0] < scores["macro_f1"]["estimate"]
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().out
    refused = ["--max-tokens", "0", "--out", str(tmp_path / "no.csv")]
    assert main(["predict", str(classifier.out_dir), str(pbmc[0]), *refused]) == 2
    assert not (tmp_path / "no.csv").exists()


def test_vocabulary_mismatch_is_a_clear_error(classifier, pretrained, pbmc, tmp_path):
    dataset, meta = load_tokens(pbmc[0])
    other = {**meta, "vocab": default_vocab().identity()}  # cells tokenized with the 82,606-gene vocabulary
    with pytest.raises(ValueError, match="tokenized with vocabulary 'mixgf-gc30M-biomart'.*model uses 'pbmc'"):
        predict(classifier.out_dir, dataset, other)
    with pytest.raises(ValueError, match="tokenize the cells with the model's vocabulary"):
        finetune(pretrained, dataset, other, "cell_type", FinetuneConfig(epochs=1), out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="no column 'organ'"):
        finetune(pretrained, dataset, meta, "organ", FinetuneConfig(epochs=1), out_dir=tmp_path / "never")


def test_a_model_that_records_no_vocabulary_takes_one(classifier, pbmc, tmp_path):
    """A checkpoint whose config has no vocab key (Geneformer V1's) is checked against the vocabulary named for it."""
    dataset, meta = load_tokens(pbmc[0])
    copy = tmp_path / "no_vocab"
    shutil.copytree(classifier.out_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["vocab"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no vocabulary"):
        predict(copy, dataset, meta)
    with pytest.raises(ValueError, match="has 692 tokens but vocabulary 'geneformer-gc30M' has 25426"):
        predict(copy, dataset, meta, vocab=geneformer_v1_vocab())
    assert len(predict(copy, dataset.select(range(5)), meta, vocab=GeneVocab.read(copy / "vocab.tsv"))) == 5


def test_medians_are_checked_only_for_species_the_model_saw(classifier, pbmc):
    """A classifier fine-tuned on one species runs on the other's cells of the same vocabulary: the model records
    medians only for what it was trained on (here human), so mouse medians are not compared."""
    dataset, meta = load_tokens(pbmc[0])
    cells = dataset.select(range(10))
    mouse = {**meta, "species": "mouse", "medians": {"mouse": {"name": "mouse-demo", "hash": "feed", "size": 9}}}
    assert len(predict(classifier.out_dir, cells, mouse)) == 10
    human = {**meta, "medians": {"human": {"name": "other", "hash": "beef", "size": 9}}}
    with pytest.raises(ValueError, match="gene medians 'other'"):
        predict(classifier.out_dir, cells, human)


def encoder(path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith("bert.e")}


def test_weights_start_from_the_checkpoint(pretrained, pbmc, tmp_path):
    """With LR 0 the saved encoder is the pretrained one, bit for bit (it really was loaded)."""
    dataset, meta = load_tokens(pbmc[0])
    with pytest.warns(UserWarning, match="no BERT pooler weights"):
        finetune(pretrained, dataset, meta, "cell_type", FinetuneConfig(lr=0, epochs=1), out_dir=tmp_path / "lr0")
    start, saved = encoder(pretrained), encoder(tmp_path / "lr0")
    assert start.keys() == saved.keys() and len(start) > 20
    assert all(torch.equal(start[k], saved[k]) for k in start)


def test_training_only_the_cells_genes_equals_training_every_row(pretrained, pbmc, tmp_path, monkeypatch):
    """Fine-tuning trains an embedding of only the genes its cells hold and decays the other rows as AdamW would:
    the saved classifier equals one trained on every row of the embedding."""
    from mixgf.classify import _Cells

    dataset, meta = load_tokens(pbmc[0])
    cfg = FinetuneConfig(**{**FAST, "epochs": 2, "weight_decay": 0.5})  # a decay large enough to see
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pooler in the checkpoint
        compact = finetune(pretrained, dataset, meta, "cell_type", cfg, out_dir=tmp_path / "compact")
        genes = _Cells.genes
        used = genes(_Cells(dataset, MAX_LEN, MAX_LEN, 1, torch.device("cpu")), np.arange(len(dataset)))
        monkeypatch.setattr(_Cells, "genes", lambda self, rows: np.arange(len(pbmc[1])))
        every = finetune(pretrained, dataset, meta, "cell_type", cfg, out_dir=tmp_path / "every")
    unused = np.setdiff1d(np.arange(len(pbmc[1])), used)
    assert len(unused) > 20  # <mask> and the genes never among a cell's top 64
    start, got, expected = encoder(pretrained), encoder(tmp_path / "compact"), encoder(tmp_path / "every")
    rows = "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(got[rows][unused], start[rows][unused], atol=1e-3)  # decayed, not left as they were
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_array_equal(compact.test_predictions, every.test_predictions)


def _tiny_classifier(layers: int, dropout: float = 0.0, attention_dropout: float = 0.0, act: str = "gelu"):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=12, hidden_act=act, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout, classifier_dropout=0.0, num_labels=3, pad_token_id=0))
    with torch.no_grad():  # BERT starts its biases at 0: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("layers, act", [(1, "gelu"), (3, "relu")])
def test_classifier_logits_and_gradients_are_the_hugging_face_models(layers, act):
    """classifier_logits computes the last layer at position 0 only: the same logits and the same gradients for
    every parameter as BertForSequenceClassification's forward, on a padded batch, in training mode without dropout
    (with dropout the same computation up to its random masks)."""
    from mixgf.classify import classifier_logits

    model = _tiny_classifier(layers, act=act).train()
    ids = torch.tensor([[5, 9, 3, 7, 2, 11, 4, 8], [6, 12, 10, 0, 0, 0, 0, 0], [13, 2, 5, 9, 14, 0, 0, 0]])
    mask, labels = (ids != 0).long(), torch.tensor([0, 2, 1])
    grads = []
    for logits_of in (lambda: model(input_ids=ids, attention_mask=mask).logits,
                      lambda: classifier_logits(model, ids, mask)):
        model.zero_grad()
        logits = logits_of()
        F.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (hf_logits, hf_grads), (logits, got) = grads
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-6)
    assert got.keys() == hf_grads.keys() and len(got) == 5 + 16 * layers + 4  # pooler and classifier included
    for k in hf_grads:
        torch.testing.assert_close(got[k], hf_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("dropout, attention_dropout", [(0.3, 0.0), (0.0, 0.3)])
def test_classifier_logits_apply_dropout_only_in_training(dropout, attention_dropout):
    from mixgf.classify import classifier_logits

    model = _tiny_classifier(2, dropout, attention_dropout)
    ids = torch.tensor([[5, 9, 3, 7, 2, 11], [6, 12, 10, 4, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(classifier_logits(model, ids, mask), expected)
        model.train()
        torch.manual_seed(1)
        first = classifier_logits(model, ids, mask)
        assert not torch.allclose(first, classifier_logits(model, ids, mask))
        torch.manual_seed(1)
        torch.testing.assert_close(classifier_logits(model, ids, mask), first)


def test_cli_finetune_random_init_and_truncation_warns_once(pretrained, pbmc, tmp_path, capsys):
    out = tmp_path / "clf16"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["finetune", str(pretrained), str(pbmc[0]), "--label", "cell_type", "--out", str(out),
                     "--epochs", "1", "--max-len", "16", "--random-init", "--lr", "0"]) == 0
    cut = [w for w in caught if "cut to their 16 top-ranked genes" in str(w.message)]
    assert len(cut) == 1 and "700 of 700 cells" in str(cut[0].message)
    assert "epoch 1 (best on validation): val accuracy" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["max_len"] == 16 and config["architectures"] == ["BertForSequenceClassification"]
    start, fresh = encoder(pretrained), encoder(out)  # --random-init (and LR 0): fresh weights, same shapes
    assert all(start[k].shape == fresh[k].shape for k in start)
    name = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(start[name], fresh[name])

    dataset, meta = load_tokens(pbmc[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(out, dataset, meta)  # 64-gene cells into a 16-gene classifier
    assert sum("cut to their 16 top-ranked genes" in str(w.message) for w in caught) == 1


def test_a_checkpoint_without_encoder_weights_is_refused(pretrained, pbmc, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(pretrained, broken)
    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if "encoder.layer.1." not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})
    dataset, meta = load_tokens(pbmc[0])
    with pytest.raises(ValueError, match="lacks encoder weights"):
        finetune(broken, dataset, meta, "cell_type", FinetuneConfig(epochs=1), out_dir=tmp_path / "never")


def test_predict_cli_scores_cells_of_the_other_species_through_a_correspondence(classifier, pbmc, tmp_path):
    """The classifier's types named as mouse types in a table: each (human) cell is scored against its counterpart;
    a type without one is left out and counted."""
    out = tmp_path / "predictions.csv"
    types = sorted(classifier.split.labels)
    pd.DataFrame({"mouse": types[1:], "human": types[1:]}).to_csv(tmp_path / "corr.csv", index=False)
    with pytest.warns(UserWarning, match="no correspondence"):
        assert main(["predict", str(classifier.out_dir), str(pbmc[0]), "--out", str(out), "--label", "cell_type",
                     "--correspondence", str(tmp_path / "corr.csv")]) == 0
    frame, scores = pd.read_csv(out), json.loads((tmp_path / "predictions.json").read_text())
    counted = frame[frame.cell_type != types[0]]
    assert scores["n_cells"] == len(counted) and scores["n_cells_without_counterpart"] == len(frame) - len(counted)
    assert scores["accuracy"]["estimate"] == pytest.approx((counted.predicted == counted.cell_type).mean())
    pd.DataFrame({"mouse": types}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["predict", str(classifier.out_dir), str(pbmc[0]), "--out", str(out), "--label", "cell_type",
                 "--correspondence", str(tmp_path / "bad.csv")]) == 2


def test_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales():
    """CPU dropout drops with probability p rounded to 2^-16 (0.1 -> 6554 / 65536) and scales the rest so that the
    expectation is exactly 1; dropout_add is the same mask plus the residual, in one pass."""
    from mixgf.encoder import apply_dropout, dropout_add

    dropped = 6554 / 65536
    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    out = apply_dropout(x, 0.1)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - dropped)) < 4 * (dropped * (1 - dropped) / 1e6) ** 0.5  # 4 SE
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 1 / (1 - dropped)), rtol=1e-7, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept / (1 - dropped))
    assert apply_dropout(x, 0.0) is x

    y, residual = torch.randn(64, 300), torch.randn(64, 300)
    torch.manual_seed(1)
    expected = apply_dropout(y, 0.3) + residual
    torch.manual_seed(1)
    got = dropout_add(y, residual, 0.3)
    torch.testing.assert_close(got, expected)  # a fused multiply-add: float rounding apart
    assert torch.equal(got == residual, expected == residual)  # the same elements dropped
    assert torch.equal(dropout_add(y, residual, 0.0), y + residual)


def test_inplace_layer_overwrites_its_input_and_computes_the_same():
    """bert_layer(inplace=True), the inference path, accumulates its residuals into the hidden states it is given:
    the same output as the out-of-place layer to float rounding, also under autocast (where it falls back)."""
    from mixgf.encoder import ACTIVATIONS, bert_layer, layer_weights

    model = _tiny_classifier(1).eval()
    weights = {name.removeprefix("bert."): p.detach() for name, p in model.named_parameters()}
    layer, h = layer_weights(weights, 0), torch.randn(3, 7, 16)
    expected = bert_layer(h, layer, 2, 1e-12, ACTIVATIONS["gelu"], None)
    given = h.clone()
    torch.testing.assert_close(bert_layer(given, layer, 2, 1e-12, ACTIVATIONS["gelu"], None, inplace=True), expected)
    assert not torch.equal(given, h)  # overwritten: only for hidden states the caller no longer needs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = bert_layer(h.clone(), layer, 2, 1e-12, ACTIVATIONS["gelu"], None, inplace=True)
    torch.testing.assert_close(mixed.float(), expected, rtol=0.1, atol=0.1)


def test_probabilities_side_by_side_equal_those_in_turn(classifier, pbmc):
    """On 2 threads the prediction batches run in two workers (map_batches): the same probabilities as one thread's
    batches in turn."""
    from contextlib import nullcontext

    from transformers import AutoModelForSequenceClassification

    from mixgf.classify import _Cells, _probabilities

    dataset, _ = load_tokens(pbmc[0])
    model = AutoModelForSequenceClassification.from_pretrained(classifier.out_dir)
    cells = _Cells(dataset, MAX_LEN, MAX_LEN, 1, torch.device("cpu"))
    rows = np.arange(200)
    in_turn = _probabilities(model, cells, rows, 16, nullcontext())
    torch.set_num_threads(2)
    try:
        side_by_side = _probabilities(model, cells, rows, 16, nullcontext())
    finally:
        torch.set_num_threads(1)
    np.testing.assert_allclose(side_by_side, in_turn, rtol=0, atol=1e-6)


def test_flat_optimizer_groups_train_as_per_parameter_adamw():
    """Fine-tuning's parameters live in one flat tensor per optimizer group (data and gradients as views): clipping
    and fused AdamW on them (the word embedding apart) give the weights per-parameter AdamW gives; release() unshares
    them."""
    from mixgf.classify import _FlatGroups, classifier_logits

    ids, labels = torch.tensor([[5, 9, 3, 7], [6, 12, 10, 0]]), torch.tensor([0, 2])
    trained = []
    for flatten in (False, True):
        model = _tiny_classifier(2).train()
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        apart = model.get_input_embeddings().weight
        flat = _FlatGroups(groups, apart=apart) if flatten else None
        optimizer = torch.optim.AdamW(flat.groups if flatten else groups, lr=1e-2, fused=True)
        for _ in range(3):
            F.cross_entropy(classifier_logits(model, ids, (ids != 0).long()), labels).backward()
            torch.nn.utils.clip_grad_norm_(flat.tensors if flatten else params, 0.05)  # small: clipping acts
            optimizer.step()
            if flatten:
                flat.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
        if flatten:
            assert len({p.untyped_storage().data_ptr() for p in params}) == 3  # two groups' views, the embedding
            assert len(flat.tensors) == 3 and apart.grad is None
            flat.release()
            assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
            assert all(p.grad is None for p in params)
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in trained[0]:
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(trained[0]["classifier.weight"], _tiny_classifier(2).state_dict()["classifier.weight"])


def test_inference_form_of_a_layer_is_exact_also_at_position_0_alone():
    """inference_layer_weights (no key bias, value bias folded into the output's) computes what layer_weights does,
    for every position and for position 0 alone (first_only)."""
    from mixgf.encoder import ACTIVATIONS, bert_layer, inference_layer_weights, layer_weights

    weights = {name.removeprefix("bert."): p.detach() for name, p in _tiny_classifier(1).named_parameters()}
    h, keys = torch.randn(3, 7, 16), torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 7]).bool()[:, None, None, :]
    expected = bert_layer(h, layer_weights(weights, 0), 2, 1e-12, ACTIVATIONS["gelu"], keys)
    for first_only in (False, True):
        got = bert_layer(h, inference_layer_weights(weights, 0), 2, 1e-12, ACTIVATIONS["gelu"], keys,
                         first_only=first_only)
        torch.testing.assert_close(got, expected[:, :1] if first_only else expected)


@pytest.mark.parametrize("attention_dropout", [0.0, 0.4])
def test_first_position_context_is_position_0s_attention_without_the_others_keys(attention_dropout):
    """first_position_context scores the hidden states against W_k^T q and projects their weighted mean once: the
    attention output of position 0 computed as BERT does (keys and values of every position), padded keys masked,
    with the same dropout of the attention weights (the same random mask: the generator seeded alike)."""
    from mixgf.encoder import apply_dropout, first_position_context, inference_layer_weights, layer_weights

    weights = {name.removeprefix("bert."): p.detach() for name, p in _tiny_classifier(1).named_parameters()}
    layer = layer_weights(weights, 0)
    h = torch.randn(3, 7, 16)
    keys = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()[:, None, None, :]
    q, k, v = F.linear(h, *layer["qkv"]).view(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (N, heads, L, d) each
    scores = (q[:, :, :1] @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keys, float("-inf"))
    torch.manual_seed(5)
    p = apply_dropout(torch.softmax(scores, -1), attention_dropout)
    expected = (p @ v).transpose(1, 2).reshape(3, 1, 16)
    torch.manual_seed(5)
    torch.testing.assert_close(first_position_context(h, h[:, :1], layer, 2, keys, attention_dropout), expected)
    if not attention_dropout:  # the inference form: no key bias, the value bias in the output projection's
        value_bias = layer["qkv"][1][32:]
        got = first_position_context(h, h[:, :1], inference_layer_weights(weights, 0), 2, keys)
        torch.testing.assert_close(got + value_bias, expected)


def test_batches_by_length_are_the_same_whatever_the_chunk_read_at_once(pbmc):
    """_Cells.by_length gathers the tokens a chunk of cells at a time: every chunk size gives the same batches, in
    the same order, each cell's genes in place."""
    from mixgf.classify import _Cells

    dataset, _ = load_tokens(pbmc[0])
    cells = _Cells(dataset, MAX_LEN, MAX_LEN, 8, torch.device("cpu"))
    rows = np.random.default_rng(0).permutation(len(dataset))[:100]
    runs = [list(cells.by_length(rows, 7, chunk=chunk)) for chunk in (1, 14, 20, 10_000)]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 15
        for (where, (ids, mask)), (where0, (ids0, mask0)) in zip(run, runs[0]):
            np.testing.assert_array_equal(where, where0)
            assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    where, (ids, mask) = runs[0][3]
    for i, row in enumerate(rows[where]):
        genes = dataset[int(row)]["input_ids"][:MAX_LEN]
        assert ids[i, : len(genes)].tolist() == genes and int(mask[i].sum()) == len(genes)
    lengths = [int(mask.sum(1).max()) for _, (_, mask) in runs[0]]
    assert lengths == sorted(lengths, reverse=True)  # longest first


def test_batches_hold_at_most_max_tokens_and_keep_the_longest_first_order():
    """With a token budget a batch takes as many cells as fit it (its longest cell's length times the cells, one cell
    at least, batch_size at most): the same cells in the same order as batches of a fixed size, whatever the chunk of
    cells whose tokens are read at once."""
    from mixgf.classify import _Cells

    lengths = np.random.default_rng(0).permutation(np.arange(1, 61))
    cells = [list(range(2, 2 + n)) for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": cells, "length": lengths})
    batches = _Cells(dataset, 64, 64, 1, torch.device("cpu"))
    rows = np.arange(60)
    fixed = np.concatenate([where for where, _ in batches.by_length(rows, 7)])
    for chunk in (1, 25, 8192):
        budgeted = list(batches.by_length(rows, 5, max_tokens=100, chunk=chunk))
        np.testing.assert_array_equal(np.concatenate([where for where, _ in budgeted]), fixed)
        for where, (ids, mask) in budgeted:
            longest = int(lengths[where].max())
            assert len(where) == min(5, max(100 // longest, 1)) or where is budgeted[-1][0]
            assert ids.shape == (len(where), longest) and torch.equal(mask.sum(1), torch.as_tensor(lengths[where]))
        sizes = [len(where) for where, _ in budgeted]
        assert sizes[:3] == [1, 1, 1] and sizes[-3:-1] == [5, 5]  # 60, 59, 58 genes alone; short cells 5 a batch
    assert [len(where) for where, _ in batches.by_length(rows, 5, max_tokens=2**62)] == [5] * 12  # no overflow
