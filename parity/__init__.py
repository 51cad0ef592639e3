"""parity: the PyTorch twin of `vit_jax`, the weight port between them, and the proof they agree.

    model.py    the ViT in PyTorch, class by class and stage by stage as `vit_jax/model.py`
    port.py     Flax params <-> PyTorch state_dict, from one table of correspondences
    export.py   `python -m parity.export`: a workdir's best model as a PyTorch checkpoint (.pth)
    pretrained.py  the checkpoints people have (timm's, this project's, Google's) read, their architecture too
    google.py   Google's ViT .npz -> Flax params, from one table
    adapt.py    a pretrained ViT fitted to the task: position embedding resampled, a new zero head
    convert.py  `python -m parity.convert`: any of them, adapted, as the .npz of Flax parameters that
                --init_from reads, and the command that fine-tunes it
    compare.py  `python -m parity.compare`: logits, stages and training of both, side by side
    bench.py    `python -m parity.bench`: the two train steps' speed on the same device

`parity` imports `vit_jax`; `vit_jax` never imports `parity` or torch, anywhere.
"""

import importlib.util
import sys

if importlib.util.find_spec("torch") is None:  # every `python -m parity.X` passes here first
    print("error: parity needs PyTorch, which is not installed here: pip install -e '.[parity]' (training and "
          "the vit_jax commands need neither)", file=sys.stderr)
    sys.exit(2)

import vit_jax  # noqa: E402, F401  (a command's Ctrl+C while jax and torch import: vit_jax/__init__.py)
