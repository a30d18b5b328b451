import pickle

import numpy as np
import pandas as pd
import pytest

from mixgf import vocab as V


def test_unified_vocab_keeps_geneformer_ids_then_sorted_mouse(test_data):
    gf = V.load_pickle_dict(test_data / "geneformer" / "token_dictionary_gc30M.pkl")
    vocab = V.default_vocab()
    assert vocab.tokens[:2] == ("<pad>", "<mask>")
    assert len(gf) == 25_426 and all(vocab[g] == i for g, i in gf.items())
    mouse = vocab.tokens[25_426:]
    assert len(mouse) == 57_180 and list(mouse) == sorted(mouse) and all(g.startswith("ENSMUSG") for g in mouse)
    assert len(vocab) == 82_606
    assert len(V.geneformer_v1_vocab()) == 25_426
    assert (V.default_vocab().species_ids("mouse") >= 25_426).all() and len(vocab.species_ids("human")) == 25_424


def test_bundled_medians_equal_geneformer_pickle_bit_for_bit(test_data):
    gf = V.load_pickle_dict(test_data / "geneformer" / "gene_median_dictionary_gc30M.pkl")
    med = V.default_medians("human").values
    assert len(med) == len(gf) == 25_424
    assert all(med[g] == v for g, v in gf.items())


def test_symbol_maps_and_orthologs():
    assert V.symbol_map("human")["ACTB"] == "ENSG00000075624"
    assert V.symbol_map("mouse")["Actb"] == "ENSMUSG00000029580"
    orth = V.orthologs()
    assert len(orth) == 17_122 and orth.human_id.is_unique and orth.mouse_id.is_unique
    assert orth.set_index("human_symbol").loc["ACTB", "mouse_id"] == "ENSMUSG00000029580"


def test_vocab_and_medians_round_trip(tmp_path):
    vocab = V.GeneVocab(("<pad>", "<mask>", "ENSG1", "ENSMUSG1"), name="tiny")
    vocab.write(tmp_path / "v.tsv")
    assert V.GeneVocab.read(tmp_path / "v.tsv") == vocab and V.GeneVocab.read(tmp_path / "v.tsv").hash == vocab.hash
    med = V.Medians(pd.Series([0.1 + 0.2, 1 / 3], index=["ENSG1", "ENSG2"]))
    med.write(tmp_path / "m.tsv.gz")
    back = V.Medians.read(tmp_path / "m.tsv.gz")
    assert (back.values.to_numpy() == med.values.to_numpy()).all() and back.hash == med.hash


def test_unified_vocab_imports_a_mouse_geneformer_dictionary(tmp_path):
    mouse_dict = {"<pad>": 0, "<mask>": 1, "ENSMUSG00000000003": 2, "ENSMUSG00000000001": 3}
    path = tmp_path / "MLM-re_token_dictionary_v1.pkl"
    path.write_bytes(pickle.dumps({k: np.int16(v) for k, v in mouse_dict.items()}))
    unified = V.unified_vocab(V.geneformer_v1_vocab(), V.load_pickle_dict(path))
    assert len(unified) == 25_428 and unified.tokens[-2:] == ("ENSMUSG00000000001", "ENSMUSG00000000003")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload, message", [
    ({"ENSG1": _Evil()}, "refusing to load builtins.print"),
    ([1, 2], "holds a list"),
    ({1: 2}, "key 1 is a int"),
    ({"ENSG1": [1.0]}, "value of 'ENSG1' is a list"),
    ({"ENSG1": True}, "value of 'ENSG1' is a bool"),
])
def test_pickle_loader_refuses_anything_but_plain_dicts(tmp_path, payload, message, capsys):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=message):
        V.load_pickle_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_pickle_loader_reads_numpy_scalars_as_python_numbers(tmp_path):
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": np.float64(1.5), "ENSG2": np.int16(7)}))
    assert V.load_pickle_dict(path) == {"ENSG1": 1.5, "ENSG2": 7}
    assert type(V.load_pickle_dict(path)["ENSG2"]) is int


def test_vocab_rejects_duplicates_and_bad_start():
    with pytest.raises(ValueError, match="more than once"):
        V.GeneVocab(("<pad>", "<mask>", "A", "A"))
    with pytest.raises(ValueError, match="must start with"):
        V.GeneVocab(("A", "<pad>", "<mask>"))
    with pytest.raises(ValueError, match="unknown species"):
        V.check_species("rat")


def test_subset_vocab_keeps_the_union_order_and_the_special_tokens():
    full = V.default_vocab()
    mouse, human = full.tokens[-1], full.tokens[5]
    sub = V.subset_vocab(full, {mouse, human, "not-a-gene"})
    assert sub.tokens == ("<pad>", "<mask>", human, mouse)
    assert sub.name == f"{full.name}-subset2" and sub.hash != full.hash
    unsorted = V.GeneVocab(("<pad>", "<mask>", "ENSG00000000005", "ENSG00000000003", "ENSG00000000004"), name="u")
    assert V.subset_vocab(unsorted, {"ENSG00000000003", "ENSG00000000005"}).tokens[2:] == (
        "ENSG00000000005", "ENSG00000000003")  # the vocabulary's order, not sorted
    with pytest.raises(ValueError, match="none of the 1 genes"):
        V.subset_vocab(full, {"not-a-gene"})


# the orthologs vocabulary (issue 12): a one-to-one pair shares its human token
TOY = V.GeneVocab(("<pad>", "<mask>", "ENSG01", "ENSG02", "ENSG03", "ENSMUSG01", "ENSMUSG02", "ENSMUSG09"), name="toy")
PAIRS = pd.DataFrame({"human_id": ["ENSG01", "ENSG03", "ENSG07"], "mouse_id": ["ENSMUSG01", "ENSMUSG02", "ENSMUSG07"]})


def test_orthologs_vocab_merges_each_pair_into_its_human_token():
    o = V.orthologs_vocab(TOY, PAIRS)
    assert o.tokens == ("<pad>", "<mask>", "ENSG01", "ENSG02", "ENSG03", "ENSMUSG09")  # human ids unchanged
    assert o.ids(["ENSG01", "ENSMUSG01", "ENSG03", "ENSMUSG02", "ENSMUSG09", "ENSG07"]).tolist() == [2, 2, 4, 4, 5, -1]
    assert o.gene_ids("mouse").tolist() == ["", "", "ENSMUSG01", "", "ENSMUSG02", "ENSMUSG09"]
    assert o.gene_ids("human").tolist() == ["", "", "ENSG01", "ENSG02", "ENSG03", ""]
    assert o.species_ids("mouse").tolist() == [2, 4, 5] and o.species_ids("human").tolist() == [2, 3, 4]
    assert o.hash != V.GeneVocab(o.tokens).hash  # the aliases are part of its identity


def test_ortholog_targets_render_a_cell_in_the_other_species_tokens():
    # union: a mouse token maps to its human partner's token; genes without a one-to-one partner map nowhere
    assert V.ortholog_targets(TOY, "mouse", PAIRS).tolist() == [-1, -1, -1, -1, -1, 2, 4, -1]
    assert V.ortholog_targets(TOY, "human", PAIRS).tolist() == [-1, -1, 5, -1, 6, -1, -1, -1]
    # orthologs: a shared token is its own partner
    o = V.orthologs_vocab(TOY, PAIRS)
    assert V.ortholog_targets(o, "mouse", PAIRS).tolist() == [-1, -1, 2, -1, 4, -1]
    assert V.ortholog_targets(o, "human", PAIRS).tolist() == [-1, -1, 2, -1, 4, -1]


def test_orthologs_vocab_round_trips_and_subsets_by_any_of_its_genes(tmp_path):
    o = V.orthologs_vocab(TOY, PAIRS)
    o.write(tmp_path / "o.tsv")
    assert (tmp_path / "o.tsv").read_text().splitlines()[:4] == ["token_id\ttoken\taliases", "0\t<pad>\t", "1\t<mask>\t",
                                                                  "2\tENSG01\tENSMUSG01"]
    back = V.GeneVocab.read(tmp_path / "o.tsv")
    assert back == o and back.hash == o.hash
    sub = V.subset_vocab(o, ["ENSMUSG02", "ENSG02"])  # a shared token is kept for either of its genes
    assert sub.tokens == ("<pad>", "<mask>", "ENSG02", "ENSG03") and sub.ids(["ENSMUSG02"]).tolist() == [3]


def test_bundled_orthologs_vocab_shares_every_one_to_one_pair():
    union, o = V.default_vocab(), V.orthologs_vocab(V.default_vocab())
    pairs = V.orthologs()
    pairs = pairs[pairs.human_id.isin(union.tokens)]  # 729 of the 17,122 human genes are not in Geneformer V1's
    assert len(union) - len(o) == len(pairs) == 16_393
    assert o.tokens[: len(V.geneformer_v1_vocab())] == V.geneformer_v1_vocab().tokens  # Genecorpus-30M ids stand
    assert (o.ids(pairs.mouse_id) == o.ids(pairs.human_id)).all()


def test_an_alias_must_name_a_token_and_a_gene_appears_once():
    with pytest.raises(ValueError, match="not one of its tokens"):
        V.GeneVocab(("<pad>", "<mask>", "ENSG01"), aliases=(("ENSG09", ("ENSMUSG01",)),))
    with pytest.raises(ValueError, match="more than once"):
        V.GeneVocab(("<pad>", "<mask>", "ENSG01", "ENSMUSG01"), aliases=(("ENSG01", ("ENSMUSG01",)),))
