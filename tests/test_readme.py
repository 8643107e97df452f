"""The README's library example runs as written and builds what its comments say."""

import re

import torch
from data_fixtures import REPO
from torch import nn

from brainprop import PAPER, build_model


def _block_after(text: str, marker: str) -> str:
    """The first fenced python block after ``marker`` in the README."""
    rest = text[text.index(marker) :]
    match = re.search(r"```python\n(.*?)```", rest, re.DOTALL)
    assert match, f"no python block after {marker!r}"
    return match.group(1)


def test_the_pieces_example_runs_and_builds_the_published_network(monkeypatch) -> None:
    # The committed MNIST files, wherever the environment points the data root.
    monkeypatch.setenv("BRAINPROP_DATA", str(REPO / "data"))
    code = _block_after((REPO / "README.md").read_text(), "The pieces are usable on their own")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["out"].loss)
    assert all(p.grad is not None for p in scope["model"].parameters())
    published = build_model("conv", (1, 28, 28), 10, PAPER["mnist", "conv"])

    def dropout(model: nn.Module) -> list[float]:
        return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]

    assert dropout(scope["model"]) == dropout(published) == [0.3, 0.3]
