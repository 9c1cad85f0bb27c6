"""The primary config (``TrainConfig``), the task schema, and every group's options (:data:`SCHEMAS`),
stored in Hydra's ConfigStore as ``<group>/base_<option>``.

Every group option (``lbc/configs/<group>/<option>.yaml``) extends one of these dataclasses: OmegaConf
then refuses an unknown key or a value of the wrong type while composing, and the dataclass's
``__post_init__`` checks ranges when :func:`lbc.config.validate` builds the typed objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lbc.config.classification import (
    AdamWConfig,
    CosineConfig,
    DigitsConfig,
    FolderConfig,
    ModelConfig,
    ResNetSmallConfig,
    SGDConfig,
    SyntheticConfig,
    TimmViTConfig,
    TorchvisionModelConfig,
    TrainerConfig,
)
from lbc.config.detection import (
    CocoDataConfig,
    CocoShapesDataConfig,
    DetectionTrainerConfig,
    DetectorConfig,
    StepScheduleConfig,
)
from lbc.config.lm import CausalLMConfig, LMTrainerConfig, StepCosineConfig, TextDataConfig
from lbc.config.resume import ALLOW, IGNORE, REFUSE, on_resume
from lbc.errors import require
from lbc.sparsity import METHODS


# --- task -------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    """What kind of job this is and which function runs it (``lbc-train`` calls ``task.runner(cfg)``)."""

    name: str = MISSING  # classification | detection | lm (informational: the runner is what counts)
    runner: str = MISSING  # dotted path of run(cfg: DictConfig) -> dict of final metrics

    def __post_init__(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", self.runner)), "task.runner", self.runner,
                "use the dotted path of a function, e.g. lbc.engine.trainer.run")


# --- the whole run ----------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The primary config: one option per group, the seed, and where the run writes.

    Each group field sets the resume rule of the group's keys (:mod:`lbc.config.resume`): a resumed run
    restores the optimizer (lr, betas), the scheduler (epochs, warm-up, lr range), the masks and
    scores and the data order, so a change of ``model``, ``data``, ``sparsity``, ``optim``,
    ``schedule`` or ``seed`` would silently not be used; ``trainer`` keys are honoured unless a field
    says otherwise. ``task`` picks the runner: it cannot change while the model and data stay.
    """

    model: Any = on_resume(REFUSE, default=MISSING)
    data: Any = on_resume(REFUSE, default=MISSING)
    sparsity: Any = on_resume(REFUSE, default=MISSING)
    optim: Any = on_resume(REFUSE, default=MISSING)
    schedule: Any = on_resume(REFUSE, default=MISSING)
    trainer: Any = on_resume(ALLOW, default=MISSING)
    task: Any = on_resume(IGNORE, default=MISSING)  # classification | detection: the runner, and the groups' defaults
    seed: int = on_resume(REFUSE, default=0)
    run_dir: str = on_resume(IGNORE, default=MISSING)  # config.yaml, metrics.jsonl, TensorBoard events, checkpoints


# group -> {option file name: its schema}. ``lbc/configs/<group>/<option>.yaml`` starts with
# ``defaults: [base_<option>, _self_]``; a test checks that every option file does.
SCHEMAS: dict[str, dict[str, type]] = {
    "optim": {"sgd": SGDConfig, "adamw": AdamWConfig},
    "schedule": {"cosine": CosineConfig, "step_1x": StepScheduleConfig, "cosine_steps": StepCosineConfig},
    "trainer": {"default": TrainerConfig, "detection": DetectionTrainerConfig, "lm": LMTrainerConfig},
    "data": {"digits": DigitsConfig, "imagenet": FolderConfig, "synthetic": SyntheticConfig,
             "coco": CocoDataConfig, "coco_shapes": CocoShapesDataConfig, "pydoc_topics": TextDataConfig,
             "text": TextDataConfig, "wikitext2": TextDataConfig, "hf_disk": TextDataConfig},
    "model": {"resnet_small": ResNetSmallConfig, "resnet18": TorchvisionModelConfig,
              "resnet50": TorchvisionModelConfig, "deit_small_patch16_224": TimmViTConfig,
              "faster_rcnn_r50_fpn": DetectorConfig, "mask_rcnn_r50_fpn": DetectorConfig,
              "faster_rcnn_r18_fpn_shapes": DetectorConfig, "mask_rcnn_r18_fpn_shapes": DetectorConfig,
              "smollm2_135m": CausalLMConfig, "llama_tiny": CausalLMConfig, "gpt2_tiny": CausalLMConfig,
              "llama_small": CausalLMConfig, "llama2_7b": CausalLMConfig, "hf_local": CausalLMConfig},
    "sparsity": METHODS.schemas(),  # each method's options dataclass, from the registry
    "task": {"classification": TaskConfig, "detection": TaskConfig, "lm": TaskConfig},
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_train", node=TrainConfig)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"base_{option}", node=schema)
    # for a user's own model file: defaults: [base_timm, _self_] or [base_torchvision, _self_]
    store.store(group="model", name="base_timm", node=ModelConfig(source="timm"))
    store.store(group="model", name="base_torchvision", node=TorchvisionModelConfig)
