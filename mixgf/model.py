"""Mix-Geneformer: a BERT encoder pretrained with masked-gene prediction plus SimCSE (SPEC §4).

Read top to bottom: the config and its presets, the check that a token dataset fits a model, the two pooling
rules, then the model (the SimCSE losses are in :mod:`mixgf.simcse`). A saved model is a plain BERT checkpoint:
``config.json`` says ``model_type: "bert"`` and ``architectures: ["BertForMaskedLM"]`` (the Mix-GF settings are extra
keys of it), and the weights are named as in ``transformers.BertForMaskedLM`` (``bert.*``, ``cls.predictions.*``) plus
``bert.pooler.*``. So ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification.from_pretrained`` load it
without mixgf, Geneformer's tools read it, and Geneformer V1 / Mouse-Geneformer checkpoints load as baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import BertModel, BertOnlyMLMHead, BertPreTrainedModel
from transformers.utils import ModelOutput

from mixgf.pooling import mean_pool
from mixgf.simcse import LOSSES, at_least_float32, diagnostics, simcse_loss

IGNORE_INDEX = -100  # label of positions that carry no MLM target (torch's cross-entropy default)
POOLINGS = ("first", "mean")


class MixGFConfig(BertConfig):
    """A ``BertConfig`` plus the SimCSE settings and the identity of the data the model was trained on.

    Parameters
    ----------
    simcse_loss
        ``"nt_xent"``: NT-Xent over the 2N views, what the authors' code computes (the default); ``"eq3"``: the
        paper's Eq. (3), the original SimCSE loss (:mod:`mixgf.simcse`).
    simcse_tau
        Temperature of the contrastive loss (the paper: 0.05).
    simcse_weight
        Weight of the SimCSE term in the total loss (the paper: 1). 0 switches SimCSE off and skips the second pass,
        which gives the Geneformer-style MLM-only baselines.
    pooling
        Cell embedding for SimCSE: ``"first"`` is BERT's pooler, tanh(Linear(h[:, 0])), as in the paper (with no
        CLS token, position 0 is the top-ranked gene); ``"mean"`` is the mean of the last layer over non-pad genes.
    gather_negatives
        Under DDP, use every rank's views as negatives (all-gather). False reproduces the paper (per-device negatives).
    ortholog_weight, ortholog_tau, ortholog_loss
        The cross-species contrastive term (ours; weight 0, the default, reproduces the paper): each cell is also
        rendered in the other species' tokens through the one-to-one ortholog table
        (:func:`mixgf.vocab.ortholog_targets`), and the mean-pooled embeddings of its two renderings are pulled
        together with the contrastive loss ``ortholog_loss`` (a key of :data:`mixgf.simcse.LOSSES`) at temperature
        ``ortholog_tau``; the other cells of the batch are the negatives. It trains: its gradient reaches the encoder.
    vocab, medians
        Identity (``{"name", "hash", "size"}``, ``GeneVocab.identity()``) of the vocabulary, and per species the
        identity of the gene medians (``{"human": Medians.identity(), ...}``), that tokenized the pretraining corpus;
        ``None`` for an imported checkpoint. A dataset of a species the model never saw is not checked for medians.
    max_len
        Maximum number of gene tokens per cell in the pretraining corpus.
    **kwargs
        ``BertConfig`` arguments (``vocab_size``, ``hidden_size``, ...).

    ``model_type`` stays ``"bert"``, so ``AutoConfig`` reads a saved config as a ``BertConfig`` that carries the
    settings above as extra attributes: the checkpoint needs no mixgf to load.
    """

    model_type = "bert"

    def __init__(
        self,
        simcse_loss: str = "nt_xent",
        simcse_tau: float = 0.05,
        simcse_weight: float = 1.0,
        pooling: str = "first",
        gather_negatives: bool = False,
        ortholog_weight: float = 0.0,
        ortholog_tau: float = 0.05,
        ortholog_loss: str = "nt_xent",
        vocab: dict | None = None,
        medians: dict | None = None,
        max_len: int | None = None,
        **kwargs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if simcse_loss not in LOSSES:
            raise ValueError(f"simcse_loss must be one of {tuple(LOSSES)}, got {simcse_loss!r}")
        if not simcse_tau > 0:
            raise ValueError(f"simcse_tau must be positive, got {simcse_tau}")
        if not simcse_weight >= 0:
            raise ValueError(f"simcse_weight must be >= 0, got {simcse_weight}")
        if ortholog_loss not in LOSSES:
            raise ValueError(f"ortholog_loss must be one of {tuple(LOSSES)}, got {ortholog_loss!r}")
        if not (ortholog_tau > 0 and ortholog_weight >= 0):
            raise ValueError(f"ortholog_tau must be positive and ortholog_weight >= 0, got {ortholog_tau}, {ortholog_weight}")
        self.simcse_loss = simcse_loss
        self.simcse_tau = simcse_tau
        self.simcse_weight = simcse_weight
        self.pooling = pooling
        self.gather_negatives = gather_negatives
        self.ortholog_weight = ortholog_weight
        self.ortholog_tau = ortholog_tau
        self.ortholog_loss = ortholog_loss
        self.vocab = vocab
        self.medians = medians
        self.max_len = max_len
        super().__init__(**kwargs)
        if vocab is not None and vocab["size"] != self.vocab_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} differs from the size {vocab['size']} of vocabulary {vocab['name']!r}"
            )
        if max_len is not None and max_len > self.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {self.max_position_embeddings}")


_PAPER = dict(
    num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512, hidden_act="silu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=2048,
    layer_norm_eps=1e-12, initializer_range=0.02,
)
# No attention dropout in the demo: on a CPU, dropout inside attention takes torch's SDPA off its fused kernel and
# made a demo step about twice as slow; hidden-state dropout still gives SimCSE its two views.
_DEMO = {**_PAPER, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
         "max_position_embeddings": 256, "attention_probs_dropout_prob": 0.0}


def _for_dataset(meta: dict) -> dict:
    return dict(vocab=meta["vocab"], vocab_size=meta["vocab"]["size"], medians=meta.get("medians"), max_len=meta["max_len"])


def paper_config(meta: dict, **overrides) -> MixGFConfig:
    """The paper's architecture (SPEC §4: 6 x 256, 4 heads, silu, dropout 0.1) for the token dataset described by ``meta``.

    ``meta`` is the token dataset's metadata, ``{"vocab": {...}, "medians": {...}, "max_len": int}``; ``overrides``
    are any ``MixGFConfig`` arguments, e.g. ``simcse_weight=0`` for the MLM-only baselines.
    """
    return MixGFConfig(**{**_PAPER, **_for_dataset(meta), **overrides})


def demo_config(meta: dict, **overrides) -> MixGFConfig:
    """A tiny model (2 x 64, 2 heads, 256 positions) for the demo profile and tests; otherwise as :func:`paper_config`."""
    return MixGFConfig(**{**_DEMO, **_for_dataset(meta), **overrides})


PRESETS = {"paper": paper_config, "demo": demo_config}


@dataclass
class MixGFPretrainingOutput(ModelOutput):
    """``loss`` = ``loss_mlm`` + simcse_weight x ``loss_simcse`` + ortholog_weight x ``loss_ortholog``, set only when
    labels are given, with ``diagnostics`` (:func:`mixgf.simcse.diagnostics` of each contrastive term that runs:
    ``simcse_pos_cos``, ``simcse_neg_cos``, ``simcse_accuracy``, ``ortholog_pos_cos``, ...).

    ``logits`` are (N, L, vocab) without labels, as in ``BertForMaskedLM``; with labels they are computed only at the
    masked positions, (n_masked, vocab) in row-major order of ``labels != -100``: with ~82k genes the output layer
    would otherwise dominate the cost of a step.
    """

    loss: torch.Tensor | None = None
    loss_mlm: torch.Tensor | None = None
    loss_simcse: torch.Tensor | None = None
    loss_ortholog: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] | None = None


class MixGFForPretraining(BertPreTrainedModel):
    """BERT encoder + pooler + MLM head, trained on MLM + SimCSE (the SimCSE term is skipped when its weight is 0)."""

    config_class = MixGFConfig
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: MixGFConfig):
        super().__init__(config)
        self.bert = BertModel(config)  # keeps the pooler: SimCSE's "first" pooling is BERT's pooler
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: torch.nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def pool(self, outputs: BaseModelOutputWithPooling, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cell embeddings (N, H) from the encoder's outputs, by ``config.pooling``."""
        if self.config.pooling == "first":
            return outputs.pooler_output
        return mean_pool(outputs.last_hidden_state, attention_mask)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained``, with ``config.json`` naming ``BertForMaskedLM`` as the architecture:
        the weights are BERT's, so any Hugging Face user loads them with the Auto classes."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = ["BertForMaskedLM"]
        self.config.save_pretrained(save_directory)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
        ortholog_input_ids: torch.Tensor | None = None,
        ortholog_attention_mask: torch.Tensor | None = None,
    ) -> MixGFPretrainingOutput:
        """Encode ``input_ids`` (N, L); with ``labels`` (N, L; -100 where not masked) also return the losses.

        The MLM loss is the sum over masked genes divided by ``num_items_in_batch`` (default: this batch's masked
        genes, i.e. the mean), the Hugging Face convention that lets data-parallel training average over the masked
        genes of all processes rather than over their per-process means.
        SimCSE's two dropout passes run as one pass over the batch stacked on itself: every row draws its own
        dropout masks, so this equals two passes and keeps one large matmul per layer. MLM uses the first view only.
        With ``ortholog_weight`` > 0 the cells rendered in the other species' tokens (``ortholog_input_ids``, (N, L')
        with L' <= L, from :class:`~mixgf.collate.MLMCollator` with orthologs) join that pass, and the cross-species
        term compares them with the first view; cells without any ortholog are left out of it.
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        n = len(input_ids)
        simcse = labels is not None and self.config.simcse_weight > 0
        contrast = labels is not None and self.config.ortholog_weight > 0
        if contrast and ortholog_input_ids is None:
            raise ValueError("ortholog_weight > 0 needs ortholog_input_ids: the cells rendered in the other species' "
                             "tokens (MLMCollator.for_vocab(..., orthologs=True))")
        views, masks = [input_ids] * (2 if simcse else 1), [attention_mask] * (2 if simcse else 1)
        if contrast:
            if ortholog_attention_mask is None:
                ortholog_attention_mask = (ortholog_input_ids != self.config.pad_token_id).long()
            width = input_ids.shape[1] - ortholog_input_ids.shape[1]
            views.append(F.pad(ortholog_input_ids, (0, width), value=self.config.pad_token_id))
            masks.append(F.pad(ortholog_attention_mask, (0, width)))
        all_masks = torch.cat(masks)
        outputs = self.bert(torch.cat(views), attention_mask=all_masks)
        hidden = outputs.last_hidden_state
        if labels is None:
            return MixGFPretrainingOutput(logits=self.cls(hidden))

        masked = labels != IGNORE_INDEX
        logits = self.cls(hidden[:n][masked])
        loss_mlm = F.cross_entropy(at_least_float32(logits), labels[masked], reduction="sum") / (
            masked.sum() if num_items_in_batch is None else num_items_in_batch)
        out = MixGFPretrainingOutput(loss=loss_mlm, loss_mlm=loss_mlm, logits=logits, diagnostics={})
        if simcse:
            z1, z2 = self.pool(outputs, all_masks)[: 2 * n].chunk(2)
            out.loss_simcse = simcse_loss(self.config.simcse_loss, z1, z2, self.config.simcse_tau,
                                          gather=self.config.gather_negatives)
            out.loss = out.loss + self.config.simcse_weight * out.loss_simcse
            out.diagnostics |= {f"simcse_{k}": v for k, v in diagnostics(z1, z2).items()}
        if contrast:
            has = masks[-1].bool().any(1)
            z = mean_pool(hidden[:n][has], attention_mask[has])
            z_other = mean_pool(hidden[-n:][has], masks[-1][has])
            out.loss_ortholog = simcse_loss(self.config.ortholog_loss, z, z_other, self.config.ortholog_tau)
            out.loss = out.loss + self.config.ortholog_weight * out.loss_ortholog
            out.diagnostics |= {f"ortholog_{k}": v for k, v in diagnostics(z, z_other).items()}
        return out


def import_bert_checkpoint(path, source_vocab, target_vocab, meta: dict) -> MixGFForPretraining:
    """A Geneformer-style ``BertForMaskedLM`` checkpoint (e.g. Geneformer V1, Mouse-Geneformer) as an MLM-only model
    in ``target_vocab``, for the token dataset described by ``meta``.

    The checkpoint's gene embeddings and output rows are moved to the target ids of the same genes
    (``source_vocab`` is the vocabulary it was trained with); genes it never saw keep fresh initial rows, and so does
    the pooler, which ``BertForMaskedLM`` lacks.
    """
    from transformers import BertForMaskedLM

    source = BertForMaskedLM.from_pretrained(path)
    if source.config.vocab_size != len(source_vocab):
        raise ValueError(f"{path}: has {source.config.vocab_size} tokens but vocabulary {source_vocab.name!r} has "
                         f"{len(source_vocab)}; name the vocabulary the checkpoint was trained with")
    bert_args = {k: v for k, v in source.config.to_dict().items() if k in BertConfig().to_dict()
                 and k not in ("model_type", "architectures", "transformers_version", "vocab_size")}
    model = MixGFForPretraining(MixGFConfig(**bert_args, **_for_dataset(meta), simcse_weight=0.0))
    if model.config.vocab_size != len(target_vocab):
        raise ValueError(f"the token dataset's vocabulary has {model.config.vocab_size} tokens, "
                         f"not the {len(target_vocab)} of {target_vocab.name!r}")
    target_ids = target_vocab.ids(source_vocab.tokens)
    shared = target_ids >= 0
    state = source.state_dict()
    with torch.no_grad():
        for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):  # rows indexed by gene
            model.state_dict()[name][torch.from_numpy(target_ids[shared])] = state.pop(name)[torch.from_numpy(shared)]
        state.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
        state.pop("cls.predictions.decoder.bias", None)  # tied to cls.predictions.bias
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if unexpected:
        raise ValueError(f"{path}: weights {unexpected[:3]} have no place in a BERT encoder + MLM head")
    return model
