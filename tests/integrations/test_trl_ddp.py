"""TRL adapters under plain DDP (2 gloo processes on CPU, as ``accelerate launch`` / ``torchrun`` would start them):
a global-scope method's one-pass step (drpost assembles and all-reduces ``.grad`` itself) gives the same update as the
two-pass step (pass 2 through the DDP-wrapped model and the accelerator's backward), and both ranks stay identical;
``full_training`` with accumulation over micro-steps and ranks of unequal token counts gives plain DDP SFT's update.

The worker below runs on every rank (torch.multiprocessing spawn, a free TCP port on 127.0.0.1); a failure on any
rank fails the test. Tiny float64 Llama from a config, drpost's offline byte tokenizer: no downloads.
Run: ``.venv/bin/pytest -q tests/integrations/test_trl_ddp.py``
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from tests.integrations.spawn import spawn_ranks

pytest.importorskip("trl")
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"), pytest.mark.slow]


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datasets
    from accelerate.utils import DistributedType
    from trl import SFTConfig

    from drpost.integrations.trl import DrSFTTrainer
    from drpost.world.tokenizer import build_tokenizer
    from tests.integrations.test_trl import COMMON, params, sft_data, tiny

    datasets.disable_progress_bars()
    tok = build_tokenizer()
    base = tiny(tok)
    before = params(base)
    got = {}
    for assembly in ("one_pass", "two_pass"):
        m = copy.deepcopy(base)
        args = SFTConfig(output_dir=os.path.join(out_dir, assembly), per_device_train_batch_size=3, max_steps=1,
                         learning_rate=0.5, gradient_accumulation_steps=2, ddp_backend="gloo",
                         **{**COMMON, "max_grad_norm": 0.05})
        tr = DrSFTTrainer(model=m, args=args, train_dataset=sft_data(24), processing_class=tok,
                          target_dataset=sft_data(4, off=30), dr_method="global_subset",
                          dr_options={"frac": 0.5, "assembly": assembly})
        assert tr.accelerator.distributed_type == DistributedType.MULTI_CPU and tr.accelerator.num_processes == world
        tr.train()
        assert tr.dr_last_report.info.get("world_size") == world
        got[assembly] = params(m)
    for n in before:
        d1, d2 = got["one_pass"][n] - before[n], got["two_pass"][n] - before[n]
        assert float((d1 - d2).abs().max()) <= 1e-6 * float(d2.abs().max().clamp_min(1e-30)), n
        flat = got["one_pass"][n].reshape(-1)
        other = flat.clone()
        dist.broadcast(other, 0)
        assert torch.equal(flat, other), f"rank {rank} diverged on {n}"
    assert any((got["one_pass"][n] != before[n]).any() for n in before)

    # full_training == plain DDP SFT over micro-steps and ranks of unequal token counts: the window's token mean
    # over every rank (transformers' num_items_in_batch, gathered), not a mean of per-micro-step means
    from trl import SFTTrainer

    uneven = datasets.Dataset.from_dict({"prompt": [f"q{i}=" for i in range(8)],
                                         "completion": [("abcdefgh" * 4)[:k] for k in (2, 4, 9, 30, 3, 17, 6, 25)]})
    ups = {}
    for name in ("plain", "dr"):
        m = copy.deepcopy(base)
        args = SFTConfig(output_dir=os.path.join(out_dir, name), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=0.5, gradient_accumulation_steps=2, ddp_backend="gloo", **COMMON)
        if name == "plain":
            SFTTrainer(model=m, args=args, train_dataset=uneven, processing_class=tok).train()
        else:
            DrSFTTrainer(model=m, args=args, train_dataset=uneven, processing_class=tok,
                         target_dataset=sft_data(2, off=30), dr_method="full_training").train()
        ups[name] = params(m)
    for n in before:
        d1, d2 = ups["dr"][n] - before[n], ups["plain"][n] - before[n]
        assert float((d1 - d2).abs().max()) <= 1e-6 * float(d2.abs().max().clamp_min(1e-30)), n
    # per-rank token means (average_tokens_across_devices=False) have no such weight: refused by name
    args = SFTConfig(output_dir=os.path.join(out_dir, "per_rank"), per_device_train_batch_size=2, max_steps=1,
                     ddp_backend="gloo", **{**COMMON, "average_tokens_across_devices": False})
    try:
        DrSFTTrainer(model=copy.deepcopy(base), args=args, train_dataset=uneven, processing_class=tok,
                     target_dataset=sft_data(2, off=30), dr_method="full_training")
        raise AssertionError("average_tokens_across_devices=False was not refused")
    except NotImplementedError as e:
        assert "average_tokens_across_devices" in str(e)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_one_pass_equals_two_pass_and_ranks_agree(tmp_path):
    spawn_ranks(_worker, 2, str(tmp_path))
