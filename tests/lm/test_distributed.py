"""task=lm on two CPU processes (gloo): DDP through the runner, and FSDP2 (:mod:`lbc.lm.fsdp`) by hand, each
against one process with the same global batch.

Run as a script under torchrun, this file is the job of the tests below:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lm/test_distributed.py ddp key=value ...
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lm/test_distributed.py fsdp OUT_DIR

``ddp``: ``runner.build`` + ``runner.fit`` as ``lbc-train task=lm`` runs them, then every rank saves its
method tensors (masks, alive sets, scores) to ``<run_dir>/rank<R>.pt``. ``fsdp``: :func:`fsdp_training` on
the sharded model; every rank saves its masks, rank 0 the whole model and optimizer state, the perplexity,
and the state reloaded into a fresh sharded model.

Both comparisons use SGD: with AdamW's first steps every score moves by about +-lr whatever its gradient's
size, so candidates are nearly tied and float rounding picks among them; even one process with the batch as
two accumulated halves picks different masks then (112 of 18432 mask entries at lr 3e-2, 2 steps). Under
SGD the scores move by lr x gradient, far apart compared with the reduction order's rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the tests package (not installed)

import lbc  # noqa: E402
from lbc.sparsity.nm import NMPattern, is_exactly_nm  # noqa: E402

pytest.importorskip("transformers")

# A few LBC steps of the tiny LLaMA, the global batch of 4 over 2 ranks (optim=sgd: see the module docstring).
DDP_JOB = [
    "task=lm", "model=llama_tiny", "sparsity=lbc", "sparsity.t_f=3", "schedule.steps=6", "schedule.warmup_steps=1",
    "data.seq_len=32", "data.batch_size=4", "data.max_eval_windows=4", "trainer.progress=false",
    "optim=sgd", "optim.lr=0.5",
]
PROJECTIONS = 2 * 7  # q k v o gate up down, 2 blocks
OWN = (".mask", ".alive", ".scores")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS, GLOBAL_BATCH, SEQ = 6, 4, 16
REMOVALS = ("paper", "released")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


def own_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items() if k.endswith(OWN)}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_through_the_runner_pick_the_masks_of_one_process(tmp_path, engine):
    """``lbc-torchrun --nproc_per_node=2 task=lm ...`` with DDP (the default) or FSDP2 (``trainer.fsdp=true``)."""
    from lbc.lm import runner
    from tests.helpers import compose_config

    proc = torchrun("ddp", *DDP_JOB, f"trainer.fsdp={engine == 'fsdp'}", f"run_dir={tmp_path / 'ddp'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = runner.run(compose_config([*DDP_JOB, f"run_dir={tmp_path / 'single'}"]))

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    masks = {k: v for k, v in ranks[0].items() if k.endswith(".mask")}
    assert len(masks) == PROJECTIONS and all(is_exactly_nm(m, NMPattern(2, 4)) for m in masks.values())
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:  # masks by construction, scores averaged by the method's own hook: bit-equal
        assert torch.equal(ranks[0][k], ranks[1][k]), k

    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    one = own_tensors(torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"])
    assert own_tensors(ckpt["model"]).keys() == one.keys() == ranks[0].keys()
    for k, v in one.items():  # the same global batch: the same masks, the scores up to the reduction order
        if k.endswith(".scores"):
            torch.testing.assert_close(ranks[0][k], v, rtol=0, atol=1e-5, msg=k)
        else:
            assert torch.equal(ranks[0][k], v), k

    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, STEPS]  # one record per evaluation, rank 0 alone writes
    assert records[-1]["ppl"] == pytest.approx(single["ppl"], rel=1e-5)
    assert records[-1]["sparsity/exact_nm"] == 1.0


# --- FSDP2 ------------------------------------------------------------------------------------------


def tiny_llama(removal: str = "paper") -> tuple[torch.nn.Module, Any]:
    """The notes' tiny LLaMA (seeded: every rank builds the same), LBC 2:4 attached to its 14 projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    return model, lbc.sparsify(model, "lbc", t_f=3, exclude=["lm_head"], removal=removal)


def sgd(model: torch.nn.Module, sp: Any) -> torch.optim.Optimizer:
    """SGD over the model's and the method's groups; not fused: torch 2.13 has no DTensor rule for _fused_sgd_."""
    from lbc.engine.optim import param_groups

    return torch.optim.SGD([g for g in param_groups(model, sp, 0.01) if g["params"]], lr=0.5, momentum=0.9,
                           weight_decay=0.01, fused=False)


def fsdp_training(rank: int = 0, world: int = 1,
                  removal: str = "paper") -> tuple[torch.nn.Module, Any, torch.optim.Optimizer, float]:
    """``STEPS`` steps of LBC on the tiny LLaMA, the global batch of each step split over ``world`` ranks, then
    the perplexity of 3 windows (``world`` > 1: sharded by :func:`lbc.lm.fsdp.shard`, the ranks evaluate 1 and 2
    windows). Returns (model, method, optimizer, ppl). ``removal=released`` writes the scores in ``update``
    (it zeroes the removed candidates'): the shards must take what it wrote."""
    from lbc.lm import fsdp
    from lbc.lm.evaluate import perplexity
    from lbc.sparsity.base import disable_folding

    model, sp = tiny_llama(removal)
    if world > 1:
        fsdp.shard(model, torch.device("cpu"))  # which keeps the masks multiplies (no folding) ...
    else:
        disable_folding(model)  # ... as one process must, to train the same stored weights and momentum
    opt = sgd(model, sp)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 257, (STEPS, GLOBAL_BATCH, SEQ), generator=gen)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        with fsdp.full_tensors(sp):  # a no-op in one process
            sp.update(step)
        ids = data[step, rank * local:(rank + 1) * local]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
    with fsdp.full_tensors(sp):
        sp.update(STEPS)
    sp.finalize()
    val = torch.randint(0, 257, (3 * SEQ,), generator=gen)
    with fsdp.gathered(model):
        ppl = perplexity(model, val, seq_len=SEQ, batch_size=1, device="cpu")["ppl"]
    return model, sp, opt, ppl


def _fsdp_job(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lbc.lm import fsdp

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    for removal in REMOVALS:
        model, sp, opt, ppl = fsdp_training(rank, world, removal)
        torch.save({n: sp.layer_mask(n) for n in sp.layers}, out / f"rank{rank}_{removal}.pt")
        state = {"model": fsdp.full_state(model), "optimizer": fsdp.full_state(opt), "ppl": ppl}
        if rank == 0:
            torch.save(state, out / f"state_{removal}.pt")
    fresh, fresh_sp = tiny_llama(REMOVALS[-1])  # the last state into a fresh sharded model and optimizer, and out
    fsdp.shard(fresh, torch.device("cpu"))
    fresh_opt = sgd(fresh, fresh_sp)
    fsdp.load_full_state(fresh, state["model"])
    fsdp.load_full_state(fresh_opt, state["optimizer"])
    reloaded = {"model": fsdp.full_state(fresh), "optimizer": fsdp.full_state(fresh_opt)}
    scores = fresh_sp.score_parameters()
    if rank == 0:
        torch.save({**reloaded, "scores_are_sharded": all(isinstance(s, DTensor) for s in scores),
                    "score_shard_rows": scores[0].to_local().shape[0]}, out / "reloaded.pt")
    dist.barrier()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    proc = torchrun("fsdp", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for removal in REMOVALS:
        model, sp, opt, ppl = fsdp_training(removal=removal)
        ranks = [torch.load(tmp_path / f"rank{r}_{removal}.pt", weights_only=True) for r in (0, 1)]
        assert len(ranks[0]) == PROJECTIONS and all(is_exactly_nm(m, sp.pattern) for m in ranks[0].values())
        for name, mask in sp.masks().items():  # the same masks on both ranks as in one process
            layer = name.removesuffix(".weight")
            for rank in ranks:
                assert torch.equal(rank[layer], mask.bool()), f"{removal} {layer}"

        state = torch.load(tmp_path / f"state_{removal}.pt", weights_only=True)
        one = model.state_dict()
        assert state["model"].keys() == one.keys()  # dense keys (``...weight``), whole tensors
        for k, v in one.items():  # scores too: frozen at t_f (requires_grad reached the shards), zeroed (released)
            torch.testing.assert_close(state["model"][k].to(v.dtype), v, rtol=0, atol=1e-5, msg=f"{removal} {k}")
        assert state["ppl"] == pytest.approx(ppl, rel=1e-5)
        momentum = opt.state_dict()["state"]
        assert state["optimizer"]["state"].keys() == momentum.keys()
        for i, slots in momentum.items():
            torch.testing.assert_close(state["optimizer"]["state"][i]["momentum_buffer"], slots["momentum_buffer"],
                                       rtol=0, atol=1e-5)
    released = [v for k, v in one.items() if k.endswith(".scores")]
    assert any(bool((v == 0).any()) for v in released)  # the zeroed scores the shards had to take

    reloaded = torch.load(tmp_path / "reloaded.pt", weights_only=True)
    assert reloaded["scores_are_sharded"] and reloaded["score_shard_rows"] == 32 * 32 // 4 // 2  # (G / 2, C)
    for k, v in state["model"].items():
        assert torch.equal(reloaded["model"][k], v), k
    for i, slots in state["optimizer"]["state"].items():
        assert torch.equal(reloaded["optimizer"]["state"][i]["momentum_buffer"], slots["momentum_buffer"])


if __name__ == "__main__":
    import logging

    if sys.argv[1] == "fsdp":
        _fsdp_job(Path(sys.argv[2]))
        sys.stdout.flush()
        os._exit(0)  # gloo's teardown can wait for a peer that has left (tests/sparsity/test_srste.py)
    from lbc.lm import runner
    from lbc.run import distributed
    from tests.helpers import compose_config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    cfg = compose_config(sys.argv[2:])
    training = runner.build(cfg)
    runner.fit(training)
    from lbc.lm import fsdp

    torch.save(own_tensors(fsdp.full_state(training.model)), Path(cfg.run_dir) / f"rank{distributed.rank()}.pt")
    distributed.shutdown()
