"""The paper profile's check mode (stages/check.py, mixgf check-inputs) on a tiny paper-shaped input made on the fly:
the published corpora as plain `save_to_disk` datasets (Geneformer's layout, no mixgf metadata), the dictionaries as
pickles, raw-count organ and heart files. One passing case, then one broken input at a time."""

import contextlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from mixgf.demo import ORGANS
from mixgf.vocab import default_medians, geneformer_v1_vocab

ROOT = Path(__file__).resolve().parents[1]
MOUSE_GENES = [f"ENSMUSG{i:011d}" for i in range(1, 61)]  # a stand-in Mouse-Geneformer dictionary of 60 genes


def _corpus(path: Path, n_tokens: int, seed: int) -> None:
    """A Geneformer-format corpus: input_ids (ids 2..n_tokens-1) and length, as datasets.save_to_disk writes it."""
    rng = np.random.default_rng(seed)
    cells = [rng.choice(np.arange(2, n_tokens), size=int(k), replace=False) for k in rng.integers(5, 40, 30)]
    datasets.Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]}).save_to_disk(str(path))


def _cells(path: Path, genes: list[str], obs: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = len(next(iter(obs.values())))
    x = sp.csr_matrix(rng.poisson(2.0, (n, len(genes))).astype(np.float32))
    ad.AnnData(x, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]),
               var=pd.DataFrame(index=genes)).write_h5ad(path)


@pytest.fixture
def paper_repo(tmp_path) -> Path:
    """params.yaml (the repository's, paper profile) with every input under tmp_path/inputs, all well-formed."""
    inputs = tmp_path / "inputs"
    (inputs / "organs").mkdir(parents=True), (inputs / "heart").mkdir()
    _corpus(inputs / "gc30m.dataset", len(geneformer_v1_vocab()), seed=0)
    _corpus(inputs / "mouse20m.dataset", len(MOUSE_GENES) + 2, seed=1)
    tokens = {"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(MOUSE_GENES)}
    (inputs / "mouse_tokens.pkl").write_bytes(pickle.dumps(tokens))
    (inputs / "mouse_medians.pkl").write_bytes(pickle.dumps({g: np.float32(1.5) for g in MOUSE_GENES}))
    human_genes = default_medians("human").values.index[:60].tolist()
    for species, genes in (("human", human_genes), ("mouse", MOUSE_GENES)):
        for i, organ in enumerate(ORGANS[species]):
            _cells(inputs / "organs" / f"{species}_{organ}.h5ad", genes, {"cell_type": ["a", "b"] * 10}, seed=i)
        _cells(inputs / "heart" / f"{species}_heart.h5ad", genes, {"disease": ["disease", "normal"] * 10}, seed=99)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "paper"
    paper = params["profiles"]["paper"]
    paper["medians"] = {"mouse": str(inputs / "mouse_medians.pkl")}
    paper["inputs"] = {"genecorpus_30m": str(inputs / "gc30m.dataset"), "mouse_genecorpus_20m": str(inputs / "mouse20m.dataset"),
                       "mouse_token_dictionary": str(inputs / "mouse_tokens.pkl"), "organs": str(inputs / "organs"),
                       "heart": str(inputs / "heart")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def _check(repo: Path) -> SimpleNamespace:
    """`python stages/check.py --profile paper --params <repo>/params.yaml`, run in this process (a subprocess per
    case would spend most of the test importing torch): its exit status, stdout and stderr."""
    sys.path.insert(0, str(ROOT / "stages"))
    try:
        import check as stage
    finally:
        sys.path.remove(str(ROOT / "stages"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            stage.main(["--profile", "paper", "--params", str(repo / "params.yaml")])
            code = 0
        except SystemExit as exit_:  # sys.exit("message"): status 1, the message on stderr
            code = exit_.code if isinstance(exit_.code, int) else 1
            err.write("" if isinstance(exit_.code, int) or exit_.code is None else f"{exit_.code}\n")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _edit_params(repo: Path, edit) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params["profiles"]["paper"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_well_formed_paper_inputs_pass_and_nothing_is_written(paper_repo):
    before = sorted(p for p in paper_repo.rglob("*"))
    run = _check(paper_repo)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "profile paper: OK" in run.stdout and "Genecorpus-30M 30 cells" in run.stdout
    assert f"unified vocabulary {len(geneformer_v1_vocab()) + len(MOUSE_GENES):,} tokens" in run.stdout
    assert "18 organ files" in run.stdout and "optimizer steps" in run.stdout
    assert sorted(p for p in paper_repo.rglob("*")) == before  # no cache files beside the inputs, no outputs


def test_every_missing_input_is_named_with_where_to_get_it(paper_repo):
    import shutil

    shutil.rmtree(paper_repo / "inputs" / "gc30m.dataset")
    (paper_repo / "inputs" / "organs" / "mouse_Brain.h5ad").unlink()
    run = _check(paper_repo)
    assert run.returncode == 1
    assert "inputs.genecorpus_30m:" in run.stderr and "gc30m.dataset: no such folder" in run.stderr
    assert "ctheodoris/Genecorpus-30M" in run.stderr
    assert "mouse_Brain.h5ad: no such file" in run.stderr and "obs 'cell_type'" in run.stderr
    assert "2 problem(s)" in run.stderr and "nothing was trained or written" in run.stderr


def test_a_corpus_without_length_and_one_in_another_vocabulary_are_refused(paper_repo):
    import shutil

    for name in ("gc30m.dataset", "mouse20m.dataset"):
        shutil.rmtree(paper_repo / "inputs" / name)
    datasets.Dataset.from_dict({"input_ids": [[2, 3, 4]]}).save_to_disk(str(paper_repo / "inputs" / "gc30m.dataset"))
    _corpus(paper_repo / "inputs" / "mouse20m.dataset", 5000, seed=1)  # ids far beyond the 62-token dictionary
    run = _check(paper_repo)
    assert run.returncode == 1
    assert "needs columns input_ids and length; it lacks ['length']" in run.stderr
    assert "inputs.mouse_genecorpus_20m:" in run.stderr and "outside the 62-token vocabulary" in run.stderr
    assert "give the token dictionary that made this corpus" in run.stderr


def test_a_folder_that_is_not_a_saved_dataset_is_refused(paper_repo):
    import shutil

    shutil.rmtree(paper_repo / "inputs" / "gc30m.dataset")
    (paper_repo / "inputs" / "gc30m.dataset").mkdir()
    (paper_repo / "inputs" / "gc30m.dataset" / "cells.parquet").write_bytes(b"")
    run = _check(paper_repo)
    assert run.returncode == 1
    assert "not a Geneformer-format token dataset" in run.stderr and "load_from_disk" in run.stderr


def test_normalised_counts_missing_columns_and_unlabelled_heart_states_are_refused(paper_repo):
    organs, heart = paper_repo / "inputs" / "organs", paper_repo / "inputs" / "heart"
    human = ad.read_h5ad(organs / "human_Lung.h5ad")
    human.X = human.X / 3.0  # normalised, not raw counts
    human.write_h5ad(organs / "human_Lung.h5ad")
    mouse = ad.read_h5ad(organs / "mouse_Kidney.h5ad")
    mouse.obs = mouse.obs.rename(columns={"cell_type": "celltype"})
    mouse.write_h5ad(organs / "mouse_Kidney.h5ad")
    cardio = ad.read_h5ad(heart / "human_heart.h5ad")
    cardio.obs["disease"] = ["nf", "dcm", "hcm", "nf"] * 5  # Geneformer's cardiomyopathy labels
    cardio.write_h5ad(heart / "human_heart.h5ad")
    run = _check(paper_repo)
    assert run.returncode == 1
    assert "human_Lung.h5ad: counts are not integers" in run.stderr and "give raw counts" in run.stderr
    assert "mouse_Kidney.h5ad: obs has no column(s) cell_type; columns are: celltype" in run.stderr
    assert "human_heart.h5ad: obs 'disease' lacks the state(s) 'disease', 'normal'" in run.stderr
    assert "nf -> normal, dcm and hcm -> disease" in run.stderr
    assert "3 problem(s)" in run.stderr


def test_unsafe_or_wrong_dictionaries_are_refused(paper_repo):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (paper_repo / "inputs" / "mouse_tokens.pkl").write_bytes(pickle.dumps(Evil()))
    (paper_repo / "inputs" / "mouse_medians.pkl").write_bytes(pickle.dumps({"ENSG00000000003": 1.0}))
    run = _check(paper_repo)
    assert run.returncode == 1 and "pwned" not in run.stdout
    assert "inputs.mouse_token_dictionary:" in run.stderr and "not a usable token dictionary" in run.stderr
    assert "refusing to load" in run.stderr
    assert "medians.mouse:" in run.stderr and "not mouse Ensembl ids" in run.stderr
    assert "not checked: its token dictionary is unusable" in run.stderr


def test_params_that_would_fail_later_fail_here(paper_repo):
    def edit(paper):
        paper["pretrain"]["warmup_step"] = 10  # a typo of warmup_steps
        paper["medians"]["mouse"] = "computed"  # the paper profile has no pretraining cells to compute them from
        paper["tokenize"]["max_len"] = 4096  # more genes than the paper model's 2,048 positions
        del paper["inputs"]["heart"]

    _edit_params(paper_repo, edit)
    run = _check(paper_repo)
    assert run.returncode == 1
    assert "pretrain: TypeError" in run.stderr and "warmup_step" in run.stderr
    assert "medians.mouse is 'computed'" in run.stderr
    assert "model: ValueError: max_len 4096 exceeds max_position_embeddings 2048" in run.stderr
    assert "profiles.paper.inputs.heart is not set" in run.stderr


def test_an_unknown_profile_is_named():
    run = subprocess.run([sys.executable, "stages/check.py", "--profile", "papr"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "unknown profile 'papr'" in run.stderr and "paper" in run.stderr


def test_the_cli_checks_the_same_inputs(paper_repo, capsys):
    from mixgf.cli import main

    inputs = paper_repo / "inputs"
    argv = ["check-inputs", "--genecorpus", str(inputs / "gc30m.dataset"), "--mouse-corpus", str(inputs / "mouse20m.dataset"),
            "--mouse-dictionary", str(inputs / "mouse_tokens.pkl"), "--mouse-medians", str(inputs / "mouse_medians.pkl"),
            "--organs", str(inputs / "organs"), "--heart", str(inputs / "heart")]
    assert main(argv) == 0
    assert "inputs OK" in capsys.readouterr().err
    (inputs / "heart" / "mouse_heart.h5ad").unlink()
    with pytest.raises(SystemExit, match="1 problem"):
        main(argv)
    assert "mouse_heart.h5ad: no such file" in capsys.readouterr().err
