"""Run under torchrun (2 ranks, gloo): encode the sentences of <dir>/sentences.json with batch size 4.

Every rank writes what it got to <dir>/<pooling>.rank<r>.npy (last and mean pooling); the pytest
wrapper compares them with a single-process encode.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sempa_dist.eval.encode import Encoder
from tests.scripts.rank_exit import exit_all

out = Path(sys.argv[1])
sentences = json.loads((out / "sentences.json").read_text())
dist.init_process_group("gloo")
rank = dist.get_rank()
assert dist.get_world_size() == 2
torch.set_num_threads(1)

last = Encoder.from_pretrained("tiny-llama", batch_size=4, show_progress=False)
mean = Encoder(last.hidden_fn, last.tokenizer, pooling="mean", batch_size=4, show_progress=False)
for name, enc in (("last", last), ("mean", mean)):
    np.save(out / f"{name}.rank{rank}.npy", enc.encode(sentences))
exit_all()
