"""The pipeline end to end: `dvc repro` on the tiny profile in a copy of the repository."""

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from mixgf.demo import ORGANS, organ
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab, default_vocab

ROOT = Path(__file__).resolve().parents[1]


def _copy_repo(tmp_path: Path, profile: str) -> Path:
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["profile"] = profile
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=repo, check=True)  # as a user's clone: not an empty repo
    return repo


def _run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    # stage commands say `python`: make it this interpreter, as an activated virtual environment would
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, *cmd], cwd=repo, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = _copy_repo(tmp_path_factory.mktemp("tiny"), "tiny")
    run = _run(repo, "-m", "dvc", "repro")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return repo


def test_repro_builds_corpora_and_downstream_datasets(tiny_repo):
    metrics = json.loads((tiny_repo / "metrics" / "corpus.json").read_text())
    assert metrics["mix"]["cells"] == metrics["human"]["cells"] + metrics["mouse"]["cells"] > 0
    mix, meta = load_tokens(tiny_repo / "data" / "corpus" / "mix")
    assert set(mix["species"]) == {"human", "mouse"}
    atlas_genes = {g for f in (tiny_repo / "data" / "atlas").glob("*.h5ad") for g in ad.read_h5ad(f, backed="r").var_names}
    vocab = GeneVocab.read(tiny_repo / "data" / "vocab.tsv")  # vocab.genes: atlas, in the union vocabulary's order
    assert set(vocab.tokens[2:]) == atlas_genes and meta["vocab"]["hash"] == vocab.hash
    assert [t for t in default_vocab().tokens if t in atlas_genes] == list(vocab.tokens[2:])
    assert max(mix["length"]) <= 64  # the tiny profile's max_len
    for species, organs in ORGANS.items():
        for name in organs:  # the tiny atlas is too small to hold every rare type in every split
            data, _ = load_tokens(tiny_repo / "data" / "finetune" / f"{species}_{name}")
            types = set(data["cell_type"])
            assert set(data["organ"]) == {name} and 1 < len(types) and types <= set(organ(species, name).cell_types)
    heart, _ = load_tokens(tiny_repo / "data" / "perturb" / "mouse_heart")
    assert set(heart["disease"]) == {"disease", "normal"}
    drivers = (tiny_repo / "data" / "atlas" / "drivers.tsv").read_text()
    assert "up" in drivers and "down" in drivers


def test_pretraining_and_finetuning_cells_are_disjoint(tiny_repo):
    for species in ("human", "mouse"):
        pre, _ = load_tokens(tiny_repo / "data" / "tokens" / f"{species}_pretrain")
        fine, _ = load_tokens(tiny_repo / "data" / "tokens" / f"{species}_finetune")
        assert not set(pre["cell_id"]) & set(fine["cell_id"])


def test_repro_is_deterministic_and_up_to_date(tiny_repo):
    lengths = np.load(tiny_repo / "data" / "corpus" / "mix" / "lengths.npy")
    status = _run(tiny_repo, "-m", "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    run = _run(tiny_repo, "-m", "dvc", "repro", "--force", "corpus")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (np.load(tiny_repo / "data" / "corpus" / "mix" / "lengths.npy") == lengths).all()


def test_a_forced_rerun_of_pretraining_gives_bit_identical_models(tiny_repo):
    """Issue 8: two runs on one machine write the same model (dvc.lock's hash), checkpoint and logs aside."""
    def model_hashes() -> dict:
        lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for o in lock["pretrain_baseline@geneformer"]["outs"]
                if o["path"].startswith("models/")}

    before = model_hashes()
    shutil.rmtree(tiny_repo / "checkpoints" / "pretrain" / "geneformer")  # else the rerun would only resume
    run = _run(tiny_repo, "-m", "dvc", "repro", "--force", "--single-item", "pretrain_baseline@geneformer")
    assert run.returncode == 0, run.stderr[-2000:]
    assert model_hashes() == before


def test_paper_profile_names_every_missing_input(tmp_path):
    repo = _copy_repo(tmp_path, "paper")
    run = _run(repo, "stages/corpus.py", "--vocab", "v", "--tokens", "t", "--corpus", "c", "--finetune", "f",
               "--perturb", "p", "--metrics", "m.json")
    assert run.returncode != 0
    for key in ("genecorpus_30m", "mouse_genecorpus_20m", "mouse_token_dictionary"):
        assert f"inputs.{key}" in run.stderr
    assert "ctheodoris/Genecorpus-30M" in run.stderr and not (repo / "c").exists()


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_pretrained_models_load_as_bert_and_log_curves(tiny_repo):
    from transformers import BertForMaskedLM

    for name in ("mixgf", "geneformer", "mouse_geneformer"):
        model_dir = tiny_repo / "models" / "pretrain" / name
        vocab = GeneVocab.read(tiny_repo / "data" / "vocab.tsv")
        assert BertForMaskedLM.from_pretrained(model_dir).config.vocab_size == len(vocab)
        assert (model_dir / "vocab.tsv").exists()
        metrics = json.loads((tiny_repo / "logs" / "pretrain" / name / "metrics.json").read_text())
        assert metrics["step"] == 6 and ("loss_simcse" in metrics) == (name == "mixgf")


def test_only_mixgf_depends_on_simcse_parameters(tiny_repo, tmp_path):
    params_file = tiny_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["simcse"]["tau"] = 0.1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(_run(tiny_repo, "-m", "dvc", "status", "--json").stdout)
    finally:
        params_file.write_text(original)
    assert set(status) == {"pretrain_mixgf"}


def test_killed_pretraining_resumes_under_dvc_repro_to_the_same_weights(tiny_repo):
    finished = _weights(tiny_repo / "models" / "pretrain" / "mixgf")
    shutil.rmtree(tiny_repo / "checkpoints" / "pretrain" / "mixgf")
    stage = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["stages"]["pretrain_mixgf"]["cmd"].split()[2:]
    kill_at_step_4 = (
        "import os, signal, sys\n"
        "sys.path.insert(0, 'stages')\n"
        "import mixgf.pretrain as p\n"
        "real = p.lr_at\n"
        "def lr_at(step, cfg, total):\n"
        "    if step == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(step, cfg, total)\n"
        "p.lr_at = lr_at\n"
        "import pretrain\n"
        f"pretrain.main({stage!r})\n"
    )
    killed = _run(tiny_repo, "-c", kill_at_step_4)
    assert killed.returncode == -9
    import torch

    checkpoint = tiny_repo / "checkpoints" / "pretrain" / "mixgf" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    run = _run(tiny_repo, "-m", "dvc", "repro", "pretrain_mixgf")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mixgf: resuming from the checkpoint" in run.stdout
    resumed = _weights(tiny_repo / "models" / "pretrain" / "mixgf")
    assert finished.keys() == resumed.keys()
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)


def test_paper_profile_runs_on_published_style_inputs(tmp_path):
    """The paper profile end to end up to the corpora, on stand-ins for the published files: corpora tokenized in
    Geneformer V1's and a foreign (Mouse-Geneformer-like) vocabulary without mixgf metadata, that vocabulary and
    its medians as pickles, and raw-count organ and heart files."""
    import pickle

    import pandas as pd

    from mixgf.demo import simulate_atlas
    from mixgf.tokenize import tokenize_files
    from mixgf.vocab import GeneVocab, Medians, geneformer_v1_vocab

    repo = _copy_repo(tmp_path, "paper")
    inputs = yaml.safe_load((repo / "params.yaml").read_text())["profiles"]["paper"]["inputs"]
    atlas = simulate_atlas(n_genes=1500, cells_per_organ=40, heart_cells=60, include_immune=True)
    mouse_genes = list(np.random.default_rng(0).permutation(atlas["mouse"].var_names))
    mouse_vocab = GeneVocab(("<pad>", "<mask>", *mouse_genes), name="mouse-geneformer-like")
    published = repo / Path(inputs["mouse_token_dictionary"]).parent
    published.mkdir(parents=True)
    (repo / inputs["mouse_token_dictionary"]).write_bytes(pickle.dumps({g: i for i, g in enumerate(mouse_vocab.tokens)}))
    (published / "mouse_gene_median_dictionary.pkl").write_bytes(pickle.dumps({g: 1.5 for g in mouse_genes}))
    for species, vocab, medians, key in (
            ("human", geneformer_v1_vocab(), None, "genecorpus_30m"),
            ("mouse", mouse_vocab, Medians(pd.Series(1.5, index=mouse_genes)), "mouse_genecorpus_20m")):
        cells = tmp_path / f"{species}.h5ad"
        atlas[species].write_h5ad(cells)
        tokenize_files([cells], repo / inputs[key], species=species, vocab=vocab, medians=medians, progress=False)
        (repo / inputs[key] / "mixgf_tokens.json").unlink()  # the published corpora carry no mixgf metadata
        for organ_name in (*ORGANS[species], "heart"):
            folder = repo / inputs["heart" if organ_name == "heart" else "organs"]
            folder.mkdir(parents=True, exist_ok=True)
            organ_cells = atlas[species][atlas[species].obs["organ"] == ("Heart" if organ_name == "heart" else organ_name)]
            organ_cells.copy().write_h5ad(folder / f"{species}_{organ_name}.h5ad")

    run = _run(repo, "-m", "dvc", "repro", "corpus")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((repo / "metrics" / "corpus.json").read_text())
    assert metrics["mix"]["cells"] == atlas["human"].n_obs + atlas["mouse"].n_obs
    assert metrics["mix"]["tokens_missing"] == 0
    mix, meta = load_tokens(repo / "data" / "corpus" / "mix")
    assert meta["vocab"]["size"] == 25_426 + len(mouse_genes)
    assert {s["vocab"] for s in meta["sources"]} == {"geneformer-gc30M", "mouse-geneformer"}
    brain, brain_meta = load_tokens(repo / "data" / "finetune" / "mouse_Brain")
    assert len(brain) == (atlas["mouse"].obs["organ"] == "Brain").sum() and brain_meta["max_len"] == 2048
    heart, _ = load_tokens(repo / "data" / "perturb" / "human_heart")
    assert set(heart["disease"]) == {"disease", "normal"}


def test_a_baseline_can_be_imported_from_a_geneformer_checkpoint(tiny_repo, tmp_path):
    """params baselines.<name>.checkpoint: the stage imports a Geneformer V1-vocabulary BertForMaskedLM instead of
    training, with its gene rows moved to the pipeline vocabulary's ids (the atlas's genes: vocab.genes)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from mixgf.vocab import geneformer_v1_vocab

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(geneformer_v1_vocab()), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "gf-v1")
    params_file = tiny_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["baselines"]["geneformer"]["checkpoint"] = str(tmp_path / "gf-v1")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "imported"
    try:
        run = _run(tiny_repo, "stages/pretrain.py", "--name", "geneformer", "--corpus", "data/corpus/human",
                   "--vocab", "data/vocab.tsv", "--out", str(out), "--state", str(tmp_path / "state"),
                   "--logs", str(tmp_path / "logs"))
    finally:
        params_file.write_text(original)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "imported" in run.stdout and not (tmp_path / "state").exists()
    ours = _weights(out)["bert.embeddings.word_embeddings.weight"]
    vocab, v1 = GeneVocab.read(tiny_repo / "data" / "vocab.tsv"), geneformer_v1_vocab()
    human = [t for t in vocab.tokens if t in v1]  # <pad>, <mask> and the human genes
    assert ours.shape[0] == len(vocab) and len(human) > 100
    assert torch.equal(ours[vocab.ids(human)], bert.bert.embeddings.word_embeddings.weight.detach()[v1.ids(human)])


def test_repro_writes_tables_1_2_and_figure_2_with_every_model_and_control(tiny_repo):
    for species, table in (("mouse", "table1"), ("human", "table2")):
        compare = json.loads((tiny_repo / "metrics" / "compare" / f"{species}.json").read_text())
        assert set(compare["organs"]) == set(ORGANS[species])
        for organ, row in compare["organs"].items():
            for model in (compare["baseline"], "mixgf", "random", "logreg"):
                acc = row[model]
                assert 0 <= acc["accuracy_low"] <= acc["accuracy"] <= acc["accuracy_high"] <= 1
            d = row["mixgf_minus_baseline"]
            assert d["low"] <= d["difference"] <= d["high"] and 0 < d["mcnemar_p"] <= 1
        assert 0 < compare["summary"]["mixgf_minus_baseline"]["wilcoxon_p"] <= 1
        text = (tiny_repo / "reports" / f"{table}.md").read_text()
        assert text.startswith(f"# Table {table[-1]}") and "**Demo data.**" in text
        assert all(f"| {organ} |" in text for organ in ORGANS[species])
        assert (tiny_repo / "reports" / f"{table}_{species}.ipynb").exists()
    cross = json.loads((tiny_repo / "metrics" / "cross_species.json").read_text())
    assert set(cross) == {"mouse_to_human", "human_to_mouse"}
    assert {"mixgf", "geneformer", "mouse_geneformer", "ortholog_logreg"} == set(cross["mouse_to_human"])
    for name in ("fig2_mouse_to_human.png", "fig2_human_to_mouse.png"):
        assert (tiny_repo / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    shown = json.loads(_run(tiny_repo, "-m", "dvc", "metrics", "show", "--json").stdout)
    files = {f for rev in shown.values() for f in rev["data"]}
    assert "metrics/finetune/mouse-mixgf/Brain.json" in files and "metrics/compare/human.json" in files


def test_classifiers_load_as_plain_bert_and_share_test_cells_with_the_controls(tiny_repo):
    from transformers import AutoModelForSequenceClassification

    classifier = tiny_repo / "models" / "finetune" / "human-mixgf" / "Spleen"
    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    assert set(model.config.id2label.values()) <= set(organ("human", "Spleen").cell_types)
    predictions = tiny_repo / "metrics" / "predictions"
    cells = [(predictions / f"human-{m}" / "Spleen" / "predictions.csv").read_text().splitlines()[1:]
             for m in ("mixgf", "logreg")]
    assert [c.split(",")[:3] for c in cells[0]] == [c.split(",")[:3] for c in cells[1]]


def test_repro_writes_table_3_and_figure_4_with_driver_recall(tiny_repo):
    for name in ("mouse_delete", "human_overexpress_mouse_tuned", "human_overexpress_human_tuned"):
        m = json.loads((tiny_repo / "metrics" / "perturb" / f"{name}.json").read_text())
        assert m["n_perturbations"] > 0 and 0 <= m["drivers"]["recall_at_50"] <= 1
        assert set(m["drivers"]["ranks"]) and m["drivers"]["median_rank_if_random"] == (m["n_genes"] + 1) / 2
        header = (tiny_repo / "metrics" / "perturb" / name / "stats.csv").read_text().splitlines()[0]
        assert header == "ensembl_id,symbol,n_cells,mean_shift,p_value,fdr,is_driver"
    text = (tiny_repo / "reports" / "table3.md").read_text()
    assert "**Demo data.**" in text and "ALDOB" in text and "driver recall@20" in text
    assert (tiny_repo / "reports" / "fig4_perturbation.png").read_bytes()[:4] == b"\x89PNG"


def test_every_report_exists_holds_numbers_and_the_index_lists_it(tiny_repo):
    reports = tiny_repo / "reports"
    index = (reports / "README.md").read_text()
    for name in ("table1.md", "table2.md", "fig2.md", "table3.md", "fig4.md"):
        text = (reports / name).read_text()
        assert "Demo data" in text.split("\n\n")[1] and re.search(r"\d+\.\d", text), name  # the notice, then numbers
        assert name in index
    for model, species in (("mixgf", {"human", "mouse"}), ("geneformer", {"human"}), ("random", {"human", "mouse"})):
        scores = json.loads((tiny_repo / "metrics" / "pretrain" / f"{model}.json").read_text())
        assert set(scores) == species
        assert all(s["gain_low"] <= s["gain"] <= s["gain_high"] and s["masked_genes"] > 0 for s in scores.values())
