"""lbc-export and lbc-check of language-model runs (task=lm): a save_pretrained directory that plain transformers
loads and that computes what the masked training model computes; its N:M checked along the input dimension."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lbc
from lbc.cli.check import main as check_main
from lbc.cli.export import main as export_main
from lbc.lm.model import build_causal_lm
from lbc.lm.tokenizers import byte_tokenizer

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "llama": {"model_type": "llama", "vocab_size": 257, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128},
    "gpt2": {"model_type": "gpt2", "vocab_size": 257, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
}
METHODS = {  # exactly 2:4 masks before any training
    "lbc": {"method": "lbc", "pattern": "2:4", "t_f": 0, "criterion": "magnitude"},
    "asp": {"method": "asp", "pattern": "2:4", "dense_epochs": 0},
}
CASES = [("llama", "lbc"), ("gpt2", "lbc"), ("gpt2", "asp")]


class Run:
    """A tiny lm run's last.pt (the format of LMTraining.state) and the masked model it was written from."""

    def __init__(self, root: Path, kind: str, method: str) -> None:
        torch.manual_seed(0)
        model_cfg = {"name": f"{kind}_tiny", "source": None, "gguf_file": None, "package": None,
                     "config": CONFIGS[kind], "tokenizer": "bytes", "dtype": "float32", "gradient_checkpointing": False}
        self.model, _ = build_causal_lm(**model_cfg)
        self.sp = lbc.sparsify(self.model, **METHODS[method])
        self.sp.update(0)
        assert self.sp.is_exact_nm()
        self.model.eval()
        self.conv1d = list(self.model.__dict__.get("_lbc_conv1d", []))
        self.run_dir = root / "run"
        self.run_dir.mkdir(parents=True)
        config = {"task": {"name": "lm", "runner": "lbc.lm.runner.run"}, "model": model_cfg, "sparsity": METHODS[method],
                  "seed": 0}
        torch.save({"config": config, "model": self.model.state_dict(), "sparsity": self.sp.state_dict(),
                    "hf_config": self.model.config.to_dict(), "step": 3, "epoch": 0, "metrics": {}},
                   self.run_dir / "last.pt")
        self.out = root / "out"

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids).logits

    def folded(self, name: str) -> torch.Tensor:
        """B * W of layer ``name`` computed here: the stored (dense) weight times the mask, (out, in)."""
        module = self.model.get_submodule(name)
        return module.parametrizations.weight.original.detach() * module.parametrizations.weight[0].mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exported(kind, method)``: a Run whose export (lbc-export RUN --out OUT) succeeded."""
    done: dict[tuple[str, str], Run] = {}

    def get(kind: str, method: str) -> Run:
        if (kind, method) not in done:
            run = Run(tmp_path_factory.mktemp(f"{kind}_{method}"), kind, method)
            run.out.mkdir()
            (run.out / "model.onnx").write_bytes(b"stale")  # an earlier classification export's file
            assert export_main([str(run.run_dir), "--out", str(run.out), "--quiet"]) == 0
            done[kind, method] = run
        return done[kind, method]

    return get


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(seed))


def exactly_2_of_4(weight: torch.Tensor) -> bool:
    """Every run of 4 consecutive inputs (dim 1 of an (out, in) weight) holds exactly 2 non-zeros."""
    counts = (weight != 0).reshape(weight.shape[0], -1, 4).sum(dim=-1)
    return bool((counts == 2).all())


@pytest.mark.parametrize("kind,method", CASES)
def test_from_pretrained_gives_the_masked_models_logits(exported, kind, method):
    run = exported(kind, method)
    names = {p.name for p in run.out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "report.json",
            "lbc_export.json"} <= names
    assert "model.onnx" not in names and not any(n.startswith(".") for n in names)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(run.out), local_files_only=True).eval()
    assert not any("parametrizations" in k for k in reloaded.state_dict())
    if kind == "gpt2":  # the stock class, Conv1D layers and all
        from transformers.pytorch_utils import Conv1D

        assert isinstance(reloaded.transformer.h[0].attn.c_attn, Conv1D)
    assert reloaded.config.use_cache  # lbc trains without the cache; the export is for inference
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, run.logits(ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,method", CASES)
def test_every_selected_projection_in_the_file_is_the_folded_2_4_weight(exported, kind, method):
    run = exported(kind, method)
    weights = load_file(run.out / "model.safetensors")
    assert set(run.sp.layers) and "lm_head" not in run.sp.layers
    for name in run.sp.layers:
        stored = weights[f"{name}.weight"]
        linear = stored.T if name in run.conv1d else stored  # Conv1D stores (in, out)
        assert exactly_2_of_4(linear), name
        assert torch.equal(linear, run.folded(name)), name
    if method == "lbc":  # removal=paper folds each removal into the stored weight: it is the 2:4 weight too
        name = next(iter(run.sp.layers))
        stored = run.model.get_submodule(name).parametrizations.weight.original.detach()
        assert torch.equal(stored * run.sp.layer_mask(name), stored)
    report = json.loads((run.out / "report.json").read_text())
    assert report["task"] == "lm" and report["method"] == method and report["step"] == 3
    assert report["exact_nm"] and report["nm_layers"] == len(run.sp.layers)
    assert report["max_abs_diff"] <= 1e-5
    facts = json.loads((run.out / "lbc_export.json").read_text())
    assert facts["pattern"] == "2:4" and sorted(facts["conv1d"]) == sorted(run.conv1d)


def test_the_exported_tokenizer_loads_and_encodes_like_the_original(exported):
    run = exported("gpt2", "lbc")
    loaded = transformers.AutoTokenizer.from_pretrained(str(run.out), local_files_only=True)
    original = byte_tokenizer()
    text = "def f(x):\n    return x ** 2  # héllo ✓<|endoftext|>"
    assert loaded(text).input_ids == original(text).input_ids
    assert len(loaded) == len(original) == 257 and loaded.eos_token_id == original.eos_token_id == 256


@pytest.mark.parametrize("kind,method", [("llama", "lbc"), ("gpt2", "lbc")])
def test_lbc_check_accepts_the_export_and_names_a_broken_group(exported, kind, method, tmp_path, capsys):
    run = exported(kind, method)
    assert check_main([str(run.out / "model.safetensors")]) == 0
    assert check_main([str(run.out)]) == 0  # the export directory
    assert f"all {len(run.sp.layers)} eligible layers are 2:4" in capsys.readouterr().out

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in run.out.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = list(run.sp.layers)[-1]
    linear = weights[f"{name}.weight"].T if name in run.conv1d else weights[f"{name}.weight"]
    zero = int((linear[0, :4] == 0).nonzero()[0])  # a pruned weight of output 0's first group of 4 inputs
    linear[0, zero] = 1.0  # the group is 3:4 now (in the file's own layout too: .T is a view)
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert check_main([str(broken / "model.safetensors")]) == 1
    err = capsys.readouterr().err
    assert f"{name} (1 of " in err and err.count("\n") == 1


def test_unsupported_options_are_one_line(exported, tmp_path, capsys):
    run = exported("llama", "lbc")
    for flag in ("--onnx", "--ema"):
        assert export_main([str(run.run_dir), "--out", str(tmp_path / "x"), flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} is not supported for task=lm" in err
    assert not (tmp_path / "x").exists()
