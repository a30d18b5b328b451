"""Stage medians: each species' gene medians, the divisor of rank-value encoding.

params medians.<species>: "bundled" (Geneformer V1's, human only), "computed" (streamed over this species'
pretraining cells), or a file: a TSV (ensembl_id, median) or a Geneformer-style pickle (read safely).
"""

import argparse
from pathlib import Path

import pandas as pd

from common import ROOT, load_params

from mixgf.medians import file_medians
from mixgf.vocab import Medians, default_medians, load_pickle_dict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True)
    parser.add_argument("--cells", help="pretraining cells (h5ad) for 'computed'")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    params = load_params()
    choice = str(params["medians"][args.species])
    if choice == "bundled":
        medians = default_medians(args.species)
    elif choice == "computed":
        medians = file_medians([args.cells], args.species, passes=params["medians"]["passes"],
                               name=f"{args.species}-computed")
    elif choice.endswith(".pkl"):
        medians = Medians(pd.Series(load_pickle_dict(ROOT / choice), dtype="float64"), name=Path(choice).stem)
    else:
        medians = Medians.read(ROOT / choice)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    medians.write(args.out)
    print(f"{args.species} medians ({choice}): {medians.values.size:,} genes, hash {medians.hash} -> {args.out}")


if __name__ == "__main__":
    main()
