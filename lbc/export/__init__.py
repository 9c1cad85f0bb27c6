"""Ship a trained sparse model: fold the masks into plain weights, check N:M, write safetensors and ONNX.

- :mod:`lbc.export.fold`: a training checkpoint's masks folded into the weights of a plain model
  (``B * W``, checked to compute what the masked model computes);
- :mod:`lbc.export.write`: the export directory (``model.safetensors``, ``config.yaml`` with the run's
  evaluation preprocessing and class names, ``report.json``), written atomically and read back by
  :func:`load_exported` and :func:`read_preprocess` (:func:`preprocess_image` applies it for torch users);
- :mod:`lbc.export.onnx`: ``model.onnx`` (the preprocessing in its metadata), checked with onnxruntime;
- :mod:`lbc.export.check`: ``lbc-check``'s reader and N:M checker of any weight file;
- :mod:`lbc.export.lm`: language-model runs (``task=lm``): a ``save_pretrained`` directory that
  ``AutoModelForCausalLM.from_pretrained`` loads, and ``lbc-check``'s reading of it.
"""

from lbc.export.check import (
    LayerCheck,
    check_layer,
    check_weights,
    format_checks,
    read_weights,
    require_same_keys,
)
from lbc.export.fold import (
    Folded,
    fold_checkpoint,
    infer_num_classes,
    input_size_of,
    load_training_checkpoint,
)
from lbc.export.lm import LM_FACTS, export_lm, fold_lm, write_lm
from lbc.export.onnx import ONNX_FILE, ONNX_OPSET, export_onnx
from lbc.export.write import (
    FILES,
    ONNX_CLASSES_KEY,
    ONNX_PREPROCESS_KEY,
    export_run,
    load_exported,
    preprocess_image,
    read_export_config,
    read_preprocess,
    report_json,
    write_export,
)

__all__ = [
    "FILES", "LM_FACTS", "ONNX_CLASSES_KEY", "ONNX_FILE", "ONNX_OPSET", "ONNX_PREPROCESS_KEY", "Folded", "LayerCheck", "check_layer", "check_weights",
    "export_lm", "export_onnx", "export_run", "fold_checkpoint", "fold_lm", "format_checks", "infer_num_classes",
    "input_size_of", "load_exported", "load_training_checkpoint", "preprocess_image", "read_export_config",
    "read_preprocess", "read_weights", "report_json", "require_same_keys", "write_export", "write_lm",
]
