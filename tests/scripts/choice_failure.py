"""Run under torchrun (2 ranks, gloo): rank 0's kernel choice fails (every candidate raised). Each rank
prints `RANK<r> <exception type>: <message>` and exits: nobody may wait in the broadcast."""

import sys

import torch
import torch.distributed as dist

from sempa_dist import kernel_choice
from sempa_dist.config import load_config
from tests.scripts.rank_exit import exit_all
from tests.tiny import random_examples

dist.init_process_group("gloo")
rank = dist.get_rank()


def failing_choose(cfg, examples, device, dtype):
    if rank != 0:
        raise AssertionError("only rank 0 measures")
    raise RuntimeError("model.attn_implementation: every candidate kernel failed on this machine: fa2_varlen: boom")


kernel_choice.choose = failing_choose
try:
    kernel_choice.choose_everywhere(load_config(None, []), random_examples(2), torch.device("cpu"), torch.float32)
    print(f"RANK{rank} no error", flush=True)
except Exception as e:  # noqa: BLE001 - what each rank got is the test's subject
    print(f"RANK{rank} {type(e).__name__}: {e}", flush=True)
sys.stdout.flush()
exit_all()
