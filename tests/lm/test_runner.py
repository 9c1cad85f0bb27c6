"""task=lm end to end: tiny random LLaMA and GPT-2 train, end exactly N:M, resume bit-exact after a SIGTERM,
and the model sources fail in one line."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from lbc.errors import ConfigError
from lbc.lm import runner
from lbc.lm.model import build_causal_lm
from lbc.run.signals import Stopped
from lbc.sparsity.nm import NMPattern, is_exactly_nm
from tests.helpers import assert_same_state, compose_config, run_cli

pytest.importorskip("transformers")

# A few steps of a tiny model on short sequences of the built-in corpus: seconds.
TINY_LM = [
    "task=lm",
    "model=llama_tiny",
    "schedule.steps=6",
    "schedule.warmup_steps=1",
    "optim.lr=3e-3",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.max_eval_windows=4",
    "data.calibration_sequences=8",
    "trainer.progress=false",
    "trainer.ckpt_interval=2",
]
PROJECTIONS = {"llama_tiny": 2 * 7, "gpt2_tiny": 2 * 4}  # q k v o gate up down | c_attn c_proj c_fc c_proj, x 2 blocks


def lm_config(tmp_path: Path, *overrides: str, run_dir: str = "run"):
    return compose_config([*TINY_LM, f"run_dir={tmp_path / run_dir}", *overrides])


def masks_of(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["model"].items() if k.endswith("parametrizations.weight.0.mask")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama_tiny", "gpt2_tiny"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_tiny_models_train_and_end_exactly_nm_on_every_projection(tmp_path, model, pattern):
    result = runner.run(lm_config(tmp_path, f"model={model}", "sparsity=lbc", f"sparsity.pattern={pattern}",
                                  "sparsity.t_f=3"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    masks = masks_of(ckpt)
    n, m = map(int, pattern.split(":"))
    assert len(masks) == PROJECTIONS[model]
    assert all(is_exactly_nm(mask, NMPattern(n, m)) for mask in masks.values())
    assert not any(k.startswith("lm_head.parametrizations") for k in ckpt["model"])  # the output head stays dense
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 6] and ckpt["step"] == 6
    assert records[0]["sparsity/density"] > records[-1]["sparsity/density"]
    assert all(torch.isfinite(torch.tensor(r["ppl"])) and r["ppl"] > 1 for r in records)
    assert result["ppl"] == records[-1]["ppl"] and result["sparsity/exact_nm"] == 1.0
    assert records[-1]["tokens"] == 6 * 4 * 32


@pytest.mark.slow
def test_each_evaluation_logs_one_step_line_from_its_record(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lbc"):
        runner.run(lm_config(tmp_path, "sparsity=lbc", "sparsity.t_f=3", "trainer.eval_interval=3",
                             "trainer.eval_before=true"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    printed = [m for m in caplog.messages if m.startswith("step ")]
    assert [r["step"] for r in records] == [0, 3, 6] and len(printed) == 3, printed
    assert printed[0] == f"step 0/6: ppl {records[0]['ppl']:.2f}  density {records[0]['sparsity/density']:.3f}"
    for record, message in zip(records[1:], printed[1:], strict=True):
        assert message == (f"step {record['step']}/6: loss {record['train_loss']:.4f}  ppl {record['ppl']:.2f}  "
                           f"lr {record['lr']:.2e}  density {record['sparsity/density']:.3f}  {record['seconds']:.1f}s")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lbc", "srste"])
def test_resume_after_sigterm_is_bit_exact(tmp_path, monkeypatch, method):
    over = [f"sparsity={method}"] + (["sparsity.t_f=4"] if method == "lbc" else [])
    runner.run(lm_config(tmp_path, *over, run_dir="straight"))

    real = runner.StepBatches.batch

    def terminated_at_step_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends: the run saves after this step and stops
        return real(self, step)

    monkeypatch.setattr(runner.StepBatches, "batch", terminated_at_step_3)
    with pytest.raises(Stopped) as stop:
        runner.run(lm_config(tmp_path, *over, run_dir="stopped"))
    assert "at step 4" in str(stop.value) and "holds step 4" in str(stop.value)
    assert torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"] == 4  # at most one step lost
    monkeypatch.undo()
    runner.run(lm_config(tmp_path, *over, run_dir="stopped"))

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert_same_state(straight, resumed)
    records = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 6]
    assert records[-1]["ppl"] == json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])["ppl"]


@pytest.mark.slow
def test_a_finished_run_refuses_a_changed_refused_key(tmp_path):
    runner.run(lm_config(tmp_path, "sparsity=dense", "schedule.steps=2"))
    with pytest.raises(ConfigError, match="optim.lr"):
        runner.run(lm_config(tmp_path, "sparsity=dense", "schedule.steps=2", "optim.lr=1e-2"))


def test_model_sources_fail_in_one_line(tmp_path):
    cases = {
        "meta-llama/Llama-2-7b-hf": dict(source="meta-llama/Llama-2-7b-hf"),  # a hub name, no local copy
        "no such file": dict(gguf_file=str(tmp_path / "missing.gguf")),
        "not a readable GGUF": dict(gguf_file=str(tmp_path / "corrupt.gguf")),
        "not installed": dict(gguf_file="x.gguf", package="no_such_package_lbc"),
        "config.json": dict(source=str(tmp_path)),  # a directory without a model
    }
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(64))
    for expected, kwargs in cases.items():
        with pytest.raises(ConfigError) as err:
            build_causal_lm("m", **kwargs)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert "lbc never downloads" in str(pytest.raises(ConfigError, build_causal_lm, "m",
                                                      source="meta-llama/Llama-2-7b-hf").value)


def test_gpt2_projections_are_linear_with_the_same_outputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    model, _ = build_causal_lm("g", config={"model_type": "gpt2", "vocab_size": 257, "n_embd": 32, "n_layer": 2,
                                            "n_head": 4, "n_positions": 64}, tokenizer="bytes")
    from lbc.lm.model import hf_state_dict

    model.load_state_dict({k: v for k, v in _lbc_layout(stock).items()})
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, stock(ids).logits, atol=1e-5)
    back = hf_state_dict(model.state_dict(), model._lbc_conv1d)
    assert all(torch.equal(back[k], v) for k, v in stock.state_dict().items())


def _lbc_layout(stock) -> dict[str, torch.Tensor]:
    from lbc.lm.model import conv1d_names

    weights = {f"{n}.weight" for n in conv1d_names(stock)}
    return {k: (v.T if k in weights else v) for k, v in stock.state_dict().items()}


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    code, _, err = run_cli(*TINY_LM, f"run_dir={tmp_path / 'r'}", "model=hf_local", "model.source=org/some-model")
    assert code == 2 and err.count("\n") == 1 and "lbc never downloads" in err
    code, _, err = run_cli(*TINY_LM, f"run_dir={tmp_path / 'r'}", "data.seq_len=100000")
    assert code == 2 and err.count("\n") == 1 and "data.seq_len" in err
    assert not (tmp_path / "r").exists()  # a failed start leaves no run dir behind


@pytest.mark.slow
def test_frozen_weights_learn_only_the_mask_from_a_sparsegpt_prior(tmp_path):
    """MaskLLM's setting: LBC scores start from SparseGPT's mask; every weight of the model stays as built."""
    from lbc.engine.trainer import seed_everything

    cfg = lm_config(tmp_path, "sparsity=lbc", "sparsity.train_weights=false", "sparsity.prior=sparsegpt",
                    "sparsity.score_lr=0.05", "sparsity.t_f=3")
    runner.run(cfg)
    seed_everything(0)  # the runner builds the model right after seeding with cfg.seed
    built, _ = build_causal_lm(**{k: v for k, v in dict(cfg.model).items()})
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key, value in built.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key  # embeddings, norms, projections: bit-identical
    scores = [v for k, v in ckpt["model"].items() if k.endswith(".scores")]
    assert len(scores) == PROJECTIONS["llama_tiny"]
    assert len({float(x) for s in scores for x in s.unique()}) > 2  # they learned: not just 1 and 1 + margin
    assert all(is_exactly_nm(m, NMPattern(2, 4)) for m in masks_of(ckpt).values())
