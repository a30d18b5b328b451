"""Token datasets on disk: Hugging Face ``save_to_disk`` layout written as a stream, plus mixgf metadata.

Writing shard by shard straight into the layout ``datasets.load_from_disk`` reads (Arrow stream files,
``state.json``, ``dataset_info.json``) keeps memory flat and avoids the full copy that building a ``Dataset``
and calling ``save_to_disk`` would make. ``mixgf_tokens.json`` beside them records the vocabulary, medians and
maximum length that made the tokens, so a model can refuse a dataset made with another vocabulary.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import xxhash

from mixgf.io import read_json, write_json_atomic
from mixgf.vocab import SPECIES

METADATA_FILE = "mixgf_tokens.json"


class TokenDatasetWriter:
    """Append record batches to ``directory`` (which must be new and empty); ``close(metadata)`` finishes it.

    Batches are written by a background thread (Arrow writes release the GIL), so disk I/O overlaps the caller's
    work; at most ``max_pending`` batches wait, which bounds memory.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 500 * 2**20, max_pending: int = 2):
        self.directory, self.max_shard_bytes, self.max_pending = Path(directory), max_shard_bytes, max_pending
        self.features, self.schema, self._stream, self._sink = None, None, None, None
        self.shards: list[Path] = []
        self.rows, self._shard_bytes = 0, 0
        self._digest = xxhash.xxh3_128()  # content fingerprint: what a checkpoint records of its corpus
        self._io = ThreadPoolExecutor(1, thread_name_prefix="mixgf-write")
        self._pending: deque[Future] = deque()

    def write(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            from datasets import Features

            self.features = Features.from_arrow_schema(batch.schema)
            self.schema = self.features.arrow_schema
        batch = batch.cast(self.schema) if batch.schema != self.schema else batch
        if self._stream is None or self._shard_bytes >= self.max_shard_bytes:
            self._open_shard()
        self._pending.append(self._io.submit(self._stream.write_batch, batch))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()  # re-raises a failed write here
        self._shard_bytes += batch.nbytes
        self.rows += batch.num_rows
        self._fingerprint(batch)

    def _fingerprint(self, batch: pa.RecordBatch) -> None:
        """Hash the batch's content: its buffers, or its IPC bytes when it is a slice of larger buffers."""
        if any(column.offset for column in batch.columns) or any(
                isinstance(c, pa.ListArray) and c.offsets[0].as_py() for c in batch.columns):
            self._digest.update(batch.serialize())
            return
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    self._digest.update(memoryview(buffer))

    def _open_shard(self) -> None:
        self._close_shard()
        self.shards.append(self.directory / f"part-{len(self.shards):05d}.arrow")
        self._sink = pa.OSFile(str(self.shards[-1]), "wb")
        self._stream = pa.ipc.new_stream(self._sink, self.schema)
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        if self._stream is not None:
            self._stream.close()
            self._sink.close()
            self._stream = None

    def close(self, metadata: dict) -> None:
        """Name the shards as ``save_to_disk`` does and write its JSON files and the mixgf metadata."""
        from datasets import DatasetInfo

        if self.schema is None:
            raise ValueError(f"{self.directory}: no rows were written")
        self._close_shard()
        self._io.shutdown()
        n = len(self.shards)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for shard, name in zip(self.shards, names):
            shard.rename(self.directory / name)
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": self._digest.hexdigest(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        info = asdict(DatasetInfo(features=self.features))
        write_json_atomic(self.directory / "state.json", state)
        write_json_atomic(self.directory / "dataset_info.json", {k: info[k] for k in sorted(info)})
        write_json_atomic(self.directory / METADATA_FILE, metadata | {"n_rows": self.rows})


def load_tokens(path: str | Path):
    """A token dataset (memory-mapped) and its metadata (vocabulary, medians, max length, provenance)."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / METADATA_FILE).exists():
        raise FileNotFoundError(f"{path}: not a mixgf token dataset (no {METADATA_FILE}); make it with "
                                "`mixgf tokenize` (or `dvc repro` for the pipeline's corpora)")
    return load_from_disk(str(path)), read_json(path / METADATA_FILE)


def cells_species(meta: dict) -> str | None:
    """The one species of a token dataset's cells (``meta["species"]``: a name or a list of them), or ``None`` when
    they hold several or do not say (a merged corpus, a Geneformer-format dataset)."""
    species = meta.get("species")
    if isinstance(species, list):
        species = species[0] if len(species) == 1 else None
    return species if species in SPECIES else None


def write_rows(dataset, indices, out_dir: str | Path, metadata: dict, batch_size: int = 10_000) -> int:
    """Write the rows ``indices`` of a (memory-mapped) dataset as a new token dataset; returns the row count.

    Streams Arrow batches, so nothing is cached inside the source directory (a DVC output) and memory stays flat.
    """
    from mixgf.io import atomic_dir

    subset = dataset.select(indices)
    with atomic_dir(out_dir) as tmp:
        writer = TokenDatasetWriter(tmp)
        for batch in subset.with_format("arrow").iter(batch_size):
            for record_batch in batch.to_batches():
                writer.write(record_batch)
        if writer.schema is None:  # no rows: still a valid, empty dataset with the source's columns
            writer.write(pa.RecordBatch.from_pylist([], schema=dataset.data.schema))
        writer.close(metadata)
    return len(subset)
