"""Build the Mix-Genecorpus: merge token datasets from different vocabularies into one, shuffled, streaming.

Each source is a token dataset (``input_ids``, ``length``) in its own vocabulary: ours, Geneformer V1's
(Genecorpus-30M) or Mouse-Geneformer's (Mouse-Genecorpus-20M, with its imported dictionary). Merging remaps every
id into the target vocabulary, tags the species, shuffles all rows with a seed and writes the lengths used by
length-grouped sampling. Tokens whose gene is missing from the target vocabulary are dropped from their cell and
counted per source; nothing is dropped without a number.

The shuffle is external, so memory does not grow with the corpus: pass 1 streams every source once and sends
each row to one of K bucket files chosen at random; pass 2 loads one bucket at a time, permutes it and appends it
to the output. Random bucket + random order within the bucket is a uniform random permutation. Peak memory is one
bucket (``rows_per_bucket`` rows) plus one read batch.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from mixgf.io import atomic_dir
from mixgf.tokens import METADATA_FILE, TokenDatasetWriter, load_tokens
from mixgf.vocab import GeneVocab, check_species

MAX_BUCKETS = 256  # open bucket files in pass 1


@dataclass(frozen=True)
class Source:
    """A token dataset to merge: where it is, which vocabulary its ids use, which species its cells are."""

    path: str
    vocab: GeneVocab
    species: str


@dataclass
class SourceSummary:
    path: str
    species: str
    vocab: str
    cells: int = 0
    cells_empty_after_remap: int = 0
    tokens: int = 0
    tokens_missing: int = 0
    genes_missing: int = 0

    def line(self) -> str:
        return (f"{self.path} ({self.species}, vocabulary {self.vocab}): {self.cells:,} cells, "
                f"{self.tokens_missing:,} of {self.tokens:,} tokens dropped ({self.genes_missing:,} genes not in the "
                f"target vocabulary), {self.cells_empty_after_remap:,} cells left empty and dropped")


def remap_table(source: GeneVocab, target: GeneVocab) -> np.ndarray:
    """``table[source_id]`` = target id of the same token, -1 where the target vocabulary lacks it."""
    return target.ids(source.tokens).astype(np.int64)


def remap_input_ids(input_ids: pa.ListArray, table: np.ndarray) -> tuple[pa.ListArray, int]:
    """Map a list column of ids through ``table``, dropping ids that map to -1; also returns how many dropped."""
    offsets = input_ids.offsets.to_numpy()  # of a sliced array: may not start at 0
    ids = table[input_ids.flatten().to_numpy(zero_copy_only=False)]
    keep = ids >= 0
    kept_before = np.concatenate(([0], np.cumsum(keep)))
    new_offsets = kept_before[offsets - offsets[0]]
    values = pa.array(ids[keep].astype(np.int32))
    return pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), values), int((~keep).sum())


def merge_corpora(sources: list[Source], out_dir, vocab: GeneVocab, *, seed: int = 42,
                  rows_per_bucket: int = 100_000, batch_size: int = 10_000, extra_metadata: dict | None = None,
                  progress: bool = True) -> list[SourceSummary]:
    """Merge ``sources`` into one shuffled token dataset at ``out_dir`` in ``vocab``'s ids.

    Columns: ``input_ids``, ``length``, ``species``, ``source`` (index into ``sources``) and ``row`` (row in that
    source), so every merged cell can be traced back. Writes ``lengths.npy`` (int32, row order) beside it.
    """
    opened = [_open_source(s) for s in sources]
    datasets = [data for data, _ in opened]
    total = sum(len(d) for d in datasets)
    n_buckets = int(min(MAX_BUCKETS, max(1, -(-total // rows_per_bucket))))
    rng = np.random.default_rng(seed)
    summaries = [SourceSummary(s.path, s.species, s.vocab.name) for s in sources]

    with atomic_dir(out_dir) as tmp:
        buckets = tmp / "buckets"
        buckets.mkdir()
        _distribute(sources, datasets, vocab, summaries, buckets, n_buckets, rng, batch_size, progress)
        writer = TokenDatasetWriter(tmp)
        lengths = []
        for b in tqdm(range(n_buckets), desc="shuffle", disable=not progress or None):
            table = _read_bucket(buckets / f"{b:05d}.arrow")
            if table is None:
                continue
            table = table.combine_chunks()
            order = rng.permutation(table.num_rows)
            for start in range(0, len(order), batch_size):  # permuted a batch at a time: one bucket in memory
                for batch in table.take(pa.array(order[start:start + batch_size])).to_batches():
                    writer.write(batch)
            lengths.append(table.column("length").to_numpy()[order])
            del table
            pa.default_memory_pool().release_unused()  # else the allocator keeps every bucket's memory cached
            (buckets / f"{b:05d}.arrow").unlink()
        shutil.rmtree(buckets)
        if writer.rows == 0:
            raise ValueError(f"merging {', '.join(s.path for s in sources)} left no cells")
        lengths = np.concatenate(lengths).astype(np.int32)
        np.save(tmp / "lengths.npy", lengths)
        medians = {k: v for _, meta in opened for k, v in meta.get("medians", {}).items()}
        max_len = max([int(lengths.max())] + [meta["max_len"] for _, meta in opened if "max_len" in meta])
        writer.close({"format": 1, "species": sorted({s.species for s in sources}), "vocab": vocab.identity(),
                      "medians": medians, "max_len": max_len, "seed": seed,
                      "sources": [asdict(s) for s in summaries]} | (extra_metadata or {}))
    return summaries


def _open_source(source: Source):
    """The source's dataset and metadata (empty for a foreign dataset); mixgf metadata must name the source's
    vocabulary."""
    from datasets import load_from_disk

    check_species(source.species)
    path = Path(source.path)
    if (path / METADATA_FILE).exists():
        data, meta = load_tokens(path)
        if meta["vocab"]["hash"] != source.vocab.hash:
            raise ValueError(f"{path}: was tokenized with vocabulary {meta['vocab']['name']} ({meta['vocab']['hash']}), "
                             f"not {source.vocab.name} ({source.vocab.hash}); name the vocabulary that made it")
        return data, meta
    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: not a Hugging Face dataset directory ({err})") from None
    if "input_ids" not in data.column_names:
        raise ValueError(f"{path}: has no 'input_ids' column; columns are {', '.join(data.column_names)}")
    return data, {}


def _distribute(sources, datasets, vocab, summaries, buckets: Path, n_buckets, rng, batch_size, progress) -> None:
    """Pass 1: remap each source batch and append each row to a random bucket file."""
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("species", pa.string()),
                        ("source", pa.int16()), ("row", pa.int64())])
    sinks = [pa.OSFile(str(buckets / f"{b:05d}.arrow"), "wb") for b in range(n_buckets)]
    writers = [pa.ipc.new_stream(sink, schema) for sink in sinks]
    try:
        bar = tqdm(total=sum(len(d) for d in datasets), desc="remap", unit="cell", disable=not progress or None)
        for index, (source, data, summary) in enumerate(zip(sources, datasets, summaries)):
            table = remap_table(source.vocab, vocab)
            summary.genes_missing = int((table[2:] < 0).sum())
            start = 0
            for ids in _input_ids_batches(data, batch_size):
                remapped, missing = remap_input_ids(ids, table)
                lengths = pc.list_value_length(remapped).to_numpy(zero_copy_only=False).astype(np.int32)
                n = len(lengths)
                summary.cells += n
                summary.tokens += int(ids.offsets[-1].as_py() - ids.offsets[0].as_py())
                summary.tokens_missing += missing
                nonempty = lengths > 0
                summary.cells_empty_after_remap += int((~nonempty).sum())
                out = pa.RecordBatch.from_pydict({
                    "input_ids": remapped, "length": pa.array(lengths),
                    "species": pa.array([source.species] * n, pa.string()),
                    "source": pa.array(np.full(n, index, np.int16)), "row": pa.array(np.arange(start, start + n)),
                }, schema=schema).filter(pa.array(nonempty))
                bucket = rng.integers(n_buckets, size=out.num_rows)
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                for b in np.flatnonzero(np.diff(bounds)):
                    writers[b].write_batch(out.take(pa.array(order[bounds[b]:bounds[b + 1]])))
                start += n
                bar.update(n)
        bar.close()
    finally:
        for writer, sink in zip(writers, sinks):
            writer.close()
            sink.close()


def _input_ids_batches(data, batch_size: int):
    """The ``input_ids`` column in slices of ``batch_size`` rows, read from the dataset's Arrow files in order.

    Plain reads rather than the dataset's memory map: every page of a mapped corpus that has been read stays
    resident, so memory would grow with the corpus.
    """
    for file in data.cache_files:
        with pa.OSFile(file["filename"]) as source:
            for batch in pa.ipc.open_stream(source):
                ids = batch.column("input_ids")
                for start in range(0, len(ids), batch_size):
                    yield ids.slice(start, batch_size)


def _read_bucket(path: Path) -> pa.Table | None:
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table if table.num_rows else None
