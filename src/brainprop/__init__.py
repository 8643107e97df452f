"""brainprop: BrainProp (attention-gated, reward-based backpropagation) and EBP in PyTorch.

The library in one screen::

    from brainprop import TrainConfig, train, evaluate
    run = train(TrainConfig(dataset="mnist", arch="conv", rule="brainprop", epochs=5))
    print(run.summary["test_acc_at_best"], evaluate(run.dir)["test_acc"])

or, piece by piece::

    from brainprop import PAPER, BrainProp, build_model, load_dataset
    ds = load_dataset("mnist")
    model = build_model("conv", ds.input_shape, ds.num_classes, PAPER["mnist", "conv"])
    x, y = ds.train_x[:128].float() / 255, ds.train_y[:128]
    out = BrainProp(epsilon=0.02)(model(x), y)   # out.loss.backward() -> the BrainProp update
"""

from .config import TrainConfig
from .data import DATASETS, Dataset, DatasetEntry, load_dataset
from .errors import BrainPropError
from .evaluation import evaluate, load_model
from .feedback import FEEDBACK_MODES, PATHWAYS, Pathway, convert
from .layers import LocallyConnected2d
from .objectives import EBP, OBJECTIVES, BrainProp, Objective, Output, make_objective
from .presets import ARCHITECTURES, PAPER, PRESETS, Hyperparameters, LayerStack, build_model
from .signals import Interrupted
from .stacked import train_stacked
from .train import Run, train

__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "EBP",
    "FEEDBACK_MODES",
    "OBJECTIVES",
    "PAPER",
    "PATHWAYS",
    "PRESETS",
    "BrainProp",
    "BrainPropError",
    "Dataset",
    "DatasetEntry",
    "Hyperparameters",
    "Interrupted",
    "LayerStack",
    "LocallyConnected2d",
    "Objective",
    "Output",
    "Pathway",
    "Run",
    "TrainConfig",
    "build_model",
    "convert",
    "evaluate",
    "load_dataset",
    "load_model",
    "make_objective",
    "train",
    "train_stacked",
]
__version__ = "0.1.0"
