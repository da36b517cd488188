"""How much larger the largest input channel of each Linear is than the typical one, in the
decoder that ``jcompress run oneshot_llm`` trains.

Wanda and AWQ gain over magnitude pruning and round-to-nearest by protecting the inputs
with large activations; in large language models those are a few outlier features of the
hidden state (Dettmers et al. 2022). This script measures, on the experiment's own
calibration windows and for every Linear of every block, the largest input channel's RMS
over the median channel's RMS, and the same ratio for the channels' maxima of ``|x|``.

Usage (the model is trained first if the experiment's cache does not hold it):

  $ python scripts/llm_outlier_channels.py [--config.hidden_size=128 ...] [--json OUT]

``--config.FIELD=VALUE`` overrides the experiment's full config as ``jcompress run`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import oneshot_llm
from jcompress import blockwise, lm
from jcompress.experiments_cli import resolve_config
from jcompress.models import hf_lm


def channel_ratios(config) -> list[dict]:
    """One row per Linear: ``layer``, ``rms_ratio``, ``absmax_ratio``, ``top_absmax``, ``median_absmax``."""
    folder, streams, _ = oneshot_llm._prepare(config)
    calib = lm.sample_windows(streams["train"], num=config.calib_windows, seq_len=config.calib_seq_len, seed=config.seed)
    model, _, _ = hf_lm.load(folder)
    rows = []

    def record(calib_block):
        for name, stats in calib_block.stats.items():
            rms = np.sqrt(np.maximum(np.diag(np.asarray(stats.h)), 0.0) / float(stats.count))
            absmax = np.asarray(calib_block.channels[name].abs_max)
            rows.append(
                {
                    "layer": calib_block.prefix + name,
                    "rms_ratio": float(rms.max() / np.median(rms)),
                    "absmax_ratio": float(absmax.max() / np.median(absmax)),
                    "top_absmax": float(absmax.max()),
                    "median_absmax": float(np.median(absmax)),
                }
            )
        return blockwise.method("rtn", bits=8)(calib_block)  # the statistics are what is kept

    blockwise.compress(model, calib, record, batch_size=16)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    args, overrides = parser.parse_known_args(argv)
    config = resolve_config(oneshot_llm, quick=False, overrides=overrides)
    rows = channel_ratios(config)
    for r in rows:
        print(f"{r['layer']:40s} rms {r['rms_ratio']:6.2f}  max|x| {r['absmax_ratio']:6.2f}  ({r['top_absmax']:.2f} / {r['median_absmax']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
