"""Classify an image with an lbc export's model.onnx: onnxruntime and numpy (Pillow reads and resizes the file).

    python examples/onnx_inference.py exported/my_run/model.onnx image.png    # prints the top-5 classes

Every model-specific number (input size, resize, crop, mean, std, class names) comes from the file's
metadata, which lbc-export --onnx writes: the run's evaluation preprocessing, as lbc's val transform does it.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
pre, classes = json.loads(meta["lbc.preprocess"]), json.loads(meta.get("lbc.classes", "null"))
image = Image.open(sys.argv[2]).convert(pre["image_mode"])  # RGB, or L (grey) for the digits
short, (w, h), (ch, cw) = pre["resize"]["shorter_side"], image.size, pre["center_crop"]
size = (int(short * w / min(w, h)), int(short * h / min(w, h)))  # the short side to `short`, as torchvision does
image = image.resize(size, getattr(Image.Resampling, pre["resize"]["interpolation"].upper()))
left, top = round((size[0] - cw) / 2), round((size[1] - ch) / 2)  # the centre crop
x = np.asarray(image.crop((left, top, left + cw, top + ch)), np.float32).reshape(ch, cw, -1) / pre["divide"]
x = (np.broadcast_to(x, (ch, cw, pre["input_size"][0])) - np.float32(pre["mean"])) / np.float32(pre["std"])
logits = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(pre["dtype"])})[0][0]
p = np.exp(logits - logits.max())
p /= p.sum()
for i in np.argsort(-p)[:5]:
    print(f"{classes[i] if classes else i}\t{p[i]:.6f}")
