"""Make tests/data/geneformer-isp/ from a geneformer-isp reference folder (see tests/data/README.md).

    python tests/data/make_geneformer_isp.py PATH/TO/geneformer-isp

Copies cells_5.parquet and delete_emb_layer0_5cells.parquet unchanged, and reduces tiny_model/ (7 MB) to the rows
of its word embedding that the 5 cells use (plus <pad> and <mask>) and every other weight unchanged:
tiny_model.safetensors, with config.json beside it. tests/test_perturb.py rebuilds a full BertForMaskedLM from it
(the other embedding rows zero); the script checks that the rebuilt model's hidden states on the 5 cells equal the
original's exactly.
"""

import shutil
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM

WORD = "bert.embeddings.word_embeddings.weight"
OUT = Path(__file__).resolve().parent / "geneformer-isp"


def rebuild(folder: Path) -> BertForMaskedLM:
    """The full model from the reduced weights (the same code as tests/test_perturb.py's fixture)."""
    from transformers import BertConfig

    weights = load_file(folder / "tiny_model.safetensors")
    config = BertConfig.from_pretrained(folder)
    word = torch.zeros(config.vocab_size, config.hidden_size)
    word[weights.pop("word_embeddings.rows")] = weights.pop("word_embeddings.values")
    model = BertForMaskedLM(config)
    model.load_state_dict({**weights, WORD: word}, strict=False)
    return model.eval()


def main(source: Path) -> None:
    OUT.mkdir(exist_ok=True)
    for name in ("cells_5.parquet", "delete_emb_layer0_5cells.parquet"):
        shutil.copyfile(source / name, OUT / name)
    shutil.copyfile(source / "tiny_model" / "config.json", OUT / "config.json")
    weights = load_file(source / "tiny_model" / "model.safetensors")
    cells = pd.read_parquet(source / "cells_5.parquet")
    rows = torch.tensor(sorted({0, 1} | {int(t) for ids in cells.input_ids for t in ids}))
    reduced = {k: v.contiguous() for k, v in weights.items() if k != WORD}
    reduced |= {"word_embeddings.rows": rows, "word_embeddings.values": weights[WORD][rows].contiguous()}
    save_file(reduced, OUT / "tiny_model.safetensors")

    original = BertForMaskedLM.from_pretrained(source / "tiny_model").eval()
    rebuilt = rebuild(OUT)
    with torch.no_grad():
        for ids in cells.input_ids:
            x = torch.tensor(list(ids))[None]
            assert torch.equal(original.bert(x).last_hidden_state, rebuilt.bert(x).last_hidden_state)
    print(f"{len(rows)} embedding rows kept; hidden states on the {len(cells)} cells unchanged -> {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
