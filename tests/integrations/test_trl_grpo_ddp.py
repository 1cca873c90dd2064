"""``DrGRPOTrainer`` under plain DDP (2 gloo processes on CPU, as ``accelerate launch`` / ``torchrun`` would start them).

One spawn runs every check on both ranks (a failure on any rank fails the test):
  (a) each generation round is one ``generate`` call per rank (the general rows plus this rank's target groups); the
      general groups' advantages are TRL's over the general rows of *all* ranks (a group spans the two ranks here on
      purpose) and never see a target row; each rank's target rows form whole groups of their own, scored over the
      target rows only, with target prompts disjoint across ranks and from the general prompts;
  (b) every micro-step's one-pass update (drpost all-reduces ``.grad`` itself) equals the single-process update of
      the same regularizer on the union of both ranks' general and target rows (``layerwise_subset`` in
      ``train()`` with gradient accumulation; ``full_training`` and ``global_subset`` on one more batch afterwards, the
      latter with token-mean ``dapo`` and fewer completion tokens on rank 1), and ``full_training`` (``loss_type=
      "grpo"``) equals plain TRL's DDP gradient on the same batch (``GRPOTrainer.compute_loss`` through the
      DDP-wrapped model); after ``train()`` both ranks hold identical, finite, updated weights;
  (c) ``full_training`` with ``loss_type="dapo"`` accumulated over two micro-steps of unequal completion tokens on
      each rank equals plain TRL's DDP gradient (each micro-step weighs its share of the generation batch's tokens).
All comparisons use the rows that were sampled, so they do not depend on what the sampler drew.
Tiny float64 Llama from a config, drpost's offline byte tokenizer: no downloads.
Run: ``.venv/bin/pytest -q tests/integrations/test_trl_grpo_ddp.py``
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.integrations.spawn import spawn_ranks

pytest.importorskip("trl")
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"), pytest.mark.slow]

G = 4  # num_generations
PER_DEVICE = 3  # general rows per rank per micro-step: 2 ranks x 2 micro-steps x 3 = 3 groups of 4, one spans ranks
GA = 2  # gradient accumulation = steps_per_generation
TARGETS = ["xy#", "zw#", "qp#", "uv#"]


def _union(batch: dict) -> dict:
    """Both ranks' rows of ``batch``, rank 0's first, sequence tensors right-padded to a common length."""
    from drpost.step import merge_batches

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in batch.items()})
    out = parts[0]
    for p in parts[1:]:
        out = merge_batches(out, p, "cpu")
    return out


def _close(got: dict, want: dict, what: str, rtol: float = 5e-6) -> None:
    """float32 gradients summed in another order (DDP's all-reduce of per-rank halves against one backward): up to
    ~40 float32 epsilons of the largest entry (measured 1.1e-6 on an AVX512 Xeon, under 1e-6 on AVX2 EPYC)."""
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0, f"{what}: zero update (no signal in the batch)"
    for n in want:
        err = float((got[n] - want[n]).abs().max())
        assert err <= rtol * scale, f"{what}: {n} differs by {err / scale:.3g} (relative to the largest entry)"


def _check_groups(tok, general: dict, target: dict) -> None:
    """(a) on one generation round (this rank's rows, before TRL's shuffle)."""
    from tests.integrations.test_trl import reward_len

    def texts(b):
        return (tok.batch_decode(b["prompt_ids"], skip_special_tokens=True),
                tok.batch_decode(b["completion_ids"], skip_special_tokens=True))

    def expected(p_text, c_text):  # TRL's group-relative advantages, groups found by prompt text
        r = torch.tensor(reward_len(c_text), dtype=torch.float64)
        adv = torch.empty_like(r)
        for p in set(p_text):
            idx = torch.tensor([i for i, q in enumerate(p_text) if q == p])
            assert len(idx) == G, f"group {p!r} has {len(idx)} rows, not {G}"
            adv[idx] = (r[idx] - r[idx].mean()) / (r[idx].std() + 1e-4)
        return adv

    world, rank = dist.get_world_size(), dist.get_rank()
    gen = [None] * world
    dist.all_gather_object(gen, texts(general))
    tgt = [None] * world
    dist.all_gather_object(tgt, texts(target))
    # general: grouped over all ranks' general rows (TRL gathers the rewards), no target prompt among them
    p_all = [p for ps, _ in gen for p in ps]
    adv_all = expected(p_all, [c for _, cs in gen for c in cs])
    lo = sum(len(ps) for ps, _ in gen[:rank])
    assert not set(p_all) & set(TARGETS)
    assert any(set(gen[0][0]) & set(gen[1][0])), "no general group spans the ranks: (a) would not test TRL's gather"
    torch.testing.assert_close(general["advantages"].double().cpu(), adv_all[lo:lo + len(gen[rank][0])],
                               rtol=1e-5, atol=1e-6)
    # target: whole groups on each rank, scored among the target rows of this rank only, disjoint across ranks
    p_t, c_t = tgt[rank]
    assert set(p_t) <= set(TARGETS) and len(p_t) == GA * G
    assert not set(tgt[0][0]) & set(tgt[1][0]), "the ranks drew the same target prompt"
    torch.testing.assert_close(target["advantages"].double().cpu(), expected(p_t, c_t), rtol=1e-5, atol=1e-6)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings

    import datasets
    from accelerate.utils import DistributedType
    from trl import GRPOTrainer

    from drpost import DataRegularizer
    from drpost.integrations.trl import DrGRPOTrainer
    from drpost.world.tokenizer import build_tokenizer
    from tests.integrations.test_trl import grpo_args, reward_len, tiny
    from tests.integrations.trl_data import params, prompts

    datasets.disable_progress_bars()
    warnings.simplefilter("ignore")
    tok = build_tokenizer()
    m = tiny(tok)
    before = params(m)
    args = grpo_args(out_dir, max_steps=2, num_generations=G, per_device_train_batch_size=PER_DEVICE,
                     gradient_accumulation_steps=GA, loss_type="grpo", ddp_backend="gloo")
    tr = DrGRPOTrainer(model=m, reward_funcs=reward_len, args=args, train_dataset=prompts(6), processing_class=tok,
                       target_dataset=datasets.Dataset.from_dict({"prompt": TARGETS}),
                       dr_method="layerwise_subset", dr_options={"frac": 0.5})
    assert tr.accelerator.distributed_type == DistributedType.MULTI_CPU and tr.accelerator.num_processes == world
    assert args.steps_per_generation == GA

    # (a): record each generation round's generate calls and scored batches (general first, then the target)
    calls, scored, rounds = [], [], []
    inner_generate, inner_score = m.generate, tr._generate_and_score_completions

    def generate(*a, **kw):
        calls.append(int(kw["input_ids"].shape[0]))
        return inner_generate(*a, **kw)

    def score(inputs):
        out = inner_score(inputs)
        scored.append(out)
        if len(scored) == 2:  # the round's general and target batches
            _check_groups(tok, *scored)
            scored.clear()
            rounds.append(len(calls))
        return out

    m.generate, tr._generate_and_score_completions = generate, score

    # (b): every micro-step's one-pass update == the single-process step on the union of both ranks' rows
    inner_one_pass = tr._dr_backward_one_pass
    checked = []

    def one_pass(reg, general, target, loss_fn, lr, ga):
        ps = dict(reg.model.named_parameters())
        acc = {n: None if p.grad is None else p.grad.clone() for n, p in ps.items()}
        rep = inner_one_pass(reg, general, target, loss_fn, lr, ga)
        assert rep.info.get("world_size") == world and not rep.skipped
        got = {n: p.grad - (0 if acc[n] is None else acc[n]) for n, p in ps.items()}
        for p in ps.values():
            p.grad = None
        single = DataRegularizer(reg.model, method=tr.dr_method, process_group=None, **tr.dr_options)
        ref = single.step(_union(general), _union(target), loss_fn, lr=lr)
        want = {n: p.grad / ga for n, p in ps.items()}
        for n, p in ps.items():
            p.grad = acc[n] + got[n] if acc[n] is not None else got[n]
        _close(got, want, f"{tr.dr_method}: DDP vs single process on the union")
        torch.testing.assert_close(rep.weights, ref.weights, rtol=1e-6, atol=1e-9)
        checked.append(tr.dr_method)
        return rep

    tr._dr_backward_one_pass = one_pass

    tr.train()
    assert calls == [GA * (PER_DEVICE + G)] * 2, calls  # per round: one call, general + target rows together
    assert rounds == [1, 2]  # (a) checked on both rounds
    assert checked == ["layerwise_subset"] * (2 * GA)
    after = params(m)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[n] != before[n]).any() for n in before)
    for n, v in after.items():
        other = v.clone()
        dist.broadcast(other, 0)
        assert torch.equal(v, other), f"rank {rank} diverged on {n}"

    # one more batch through the trained (DDP-wrapped) trainer: full_training == plain TRL's DDP gradient
    assert isinstance(tr.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    m.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))  # a new round: (a) is checked again
    assert len(calls) == 3 and rounds[-1] == 3
    general = tr._dr_rows(inputs, m, target=False)
    target = tr._dr_rows(tr._dr_next_target(), m, target=True)
    m.zero_grad(set_to_none=True)
    GRPOTrainer.compute_loss(tr, tr.model_wrapped, inputs).backward()  # DDP averages the ranks' gradients
    trl_grad = {n: p.grad.clone() for n, p in m.named_parameters()}
    for method in ("full_training", "global_subset"):
        m.zero_grad(set_to_none=True)
        tr.dr_method, tr.dr_options = method, ({"frac": 0.5} if method == "global_subset" else {})
        if method == "global_subset":  # token mean (dapo) over unequal token counts: still the union's token mean
            tr.loss_type = "dapo"
            if rank == 1:
                general = {**general, "labels": general["labels"].clone()}
                general["labels"][:, -3:] = -100
        tr.regularizer = DataRegularizer(m, method=method, **tr.dr_options)
        tr._dr_backward(tr.model_wrapped, general, target)  # checks the union (one_pass above)
        if method == "full_training":
            _close({n: p.grad for n, p in m.named_parameters()}, trl_grad, "full_training vs plain TRL under DDP")
    assert checked[-2:] == ["full_training", "global_subset"]
    try:  # bnpo's per-rank token means have no union form: refused by name under DDP
        DrGRPOTrainer(model=m, reward_funcs=reward_len, processing_class=tok, train_dataset=prompts(6),
                      args=grpo_args(out_dir, max_steps=1, num_generations=G, per_device_train_batch_size=PER_DEVICE,
                                     gradient_accumulation_steps=GA, loss_type="bnpo", ddp_backend="gloo"),
                      target_dataset=datasets.Dataset.from_dict({"prompt": TARGETS}))
        raise AssertionError("loss_type='bnpo' under DDP was not refused")
    except NotImplementedError as e:
        assert "bnpo" in str(e)

    # (c) dapo over two micro-steps and two ranks of unequal completion tokens: TRL divides each micro-step's summed
    # loss by the generation batch's tokens over every rank; the adapter's full_training accumulates the same .grad
    from trl.trainer.utils import split_tensor_dict

    tr._dr_backward_one_pass = inner_one_pass
    tr.loss_type, tr.current_gradient_accumulation_steps = "dapo", GA
    tr.dr_method, tr.dr_options = "full_training", {}
    tr.regularizer = DataRegularizer(m, method="full_training")
    batch = inner_score([{"prompt": p} for p in prompts(2, off=2 * rank)["prompt"] for _ in range(G)])
    mask = batch["completion_mask"].clone()
    mask[(slice(0, G) if rank == 0 else slice(G, 2 * G)), 1 + rank:] = 0  # a short micro-step on each rank
    items = mask.sum()
    dist.all_reduce(items)
    batch["completion_mask"], batch["num_items_in_batch"] = mask, items
    chunks = split_tensor_dict(batch, GA)
    m.zero_grad(set_to_none=True)
    for c in chunks:
        GRPOTrainer.compute_loss(tr, tr.model_wrapped, c).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    for c in chunks:
        tr._dr_backward(tr.model_wrapped, tr._dr_rows(c, m, False), tr._dr_rows(c, m, True),
                        tr._dr_window_items(c, None))
    _close({n: p.grad for n, p in m.named_parameters()}, want, "dapo full_training vs plain TRL, DDP + accumulation")
    dist.barrier()
    dist.destroy_process_group()


def test_grpo_ddp_target_groups_and_one_pass_update(tmp_path):
    spawn_ranks(_worker, 2, str(tmp_path))
