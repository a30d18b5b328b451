"""Corpus merge throughput and peak memory on synthetic token rows.

    python tests/benchmarks/bench_merge.py --rows 1000000 [--length 512]

Writes two token datasets of rows/2 each — a human one in the Geneformer V1 vocabulary and a mouse one in a
shuffled "foreign" mouse vocabulary, every row `--length` random gene ids — then merges them into the unified
vocabulary in a fresh process and prints rows/s and that process's peak resident memory. Run it at two sizes to
see that memory does not grow with the number of rows.
"""

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mixgf.tokens import TokenDatasetWriter
from mixgf.vocab import GeneVocab, default_vocab, geneformer_v1_vocab


def write_rows(path: Path, n_rows: int, vocab: GeneVocab, length: int, species: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    writer = TokenDatasetWriter(path)
    for start in range(0, n_rows, 10_000):
        n = min(10_000, n_rows - start)
        ids = rng.integers(2, len(vocab), size=n * length, dtype=np.int32)
        offsets = np.arange(0, (n + 1) * length, length, dtype=np.int32)
        writer.write(pa.RecordBatch.from_pydict({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            "length": pa.array(np.full(n, length, np.int32)), "species": pa.array([species] * n)}))
    writer.close({"species": species, "vocab": vocab.identity(), "max_len": length})


MERGE = """
import sys, time
from mixgf.corpus import Source, merge_corpora
from mixgf.vocab import GeneVocab, default_vocab, geneformer_v1_vocab
human, mouse, mouse_vocab, out = sys.argv[1:5]
t0 = time.perf_counter()
merge_corpora([Source(human, geneformer_v1_vocab(), "human"), Source(mouse, GeneVocab.read(mouse_vocab), "mouse")],
              out, default_vocab(), progress=False)
print(time.perf_counter() - t0)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--length", type=int, default=512, help="tokens per row")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        unified = default_vocab()
        mouse_genes = [t for t in unified.tokens if t.startswith("ENSMUSG")]
        mouse_vocab = GeneVocab(("<pad>", "<mask>", *np.random.default_rng(0).permutation(mouse_genes)), "foreign")
        mouse_vocab.write(tmp / "mouse_vocab.tsv")
        t0 = time.perf_counter()
        write_rows(tmp / "human", args.rows // 2, geneformer_v1_vocab(), args.length, "human", 1)
        write_rows(tmp / "mouse", args.rows - args.rows // 2, mouse_vocab, args.length, "mouse", 2)
        print(f"wrote {args.rows:,} rows of {args.length} tokens in {time.perf_counter() - t0:.0f} s")
        run = subprocess.run([sys.executable, "-c", MERGE, str(tmp / "human"), str(tmp / "mouse"),
                              str(tmp / "mouse_vocab.tsv"), str(tmp / "mix")], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr)
        seconds = float(run.stdout.split()[-1])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"merged {args.rows:,} rows in {seconds:.1f} s: {args.rows / seconds:,.0f} rows/s, "
              f"peak RSS {peak:.2f} GiB")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
