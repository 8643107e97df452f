"""A run's own code, and its errors in one line: which code is the user's, which piece of it
failed, and which errors are never the user's to fix."""

import functools
import importlib.util
import sys
from pathlib import Path

import own_decorators
import own_rules
import pytest
import torch
from own_rules import (
    Doubling,
    DoublingByItsBase,
    FailsLater,
    KeepsAFunction,
    TypedRule,
    counted_net,
    doubling_net,
    fails_decorated,
    inheriting_net,
    wrapped_dense,
)
from torch import nn

from brainprop import (
    ARCHITECTURES,
    OBJECTIVES,
    PATHWAYS,
    BrainProp,
    Pathway,
    TrainConfig,
    errors,
    owncode,
)
from brainprop.distributed import LostOthers
from brainprop.errors import BrainPropError, definition
from brainprop.presets import build_model


@pytest.fixture
def registered(monkeypatch):
    """A rule and a network of one's own, both in own_rules.py."""
    monkeypatch.setitem(OBJECTIVES, "later", lambda epsilon, fused: FailsLater(at=1))
    monkeypatch.setitem(ARCHITECTURES, "doubling", (doubling_net, 0))
    config = TrainConfig(rule="later", arch="doubling")
    model = build_model("doubling", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    return config, model


def _raised(call):
    try:
        call()
    except Exception as e:
        return e
    raise AssertionError("it did not raise")


def test_the_innermost_piece_of_ones_own_code_names_the_failure(registered):
    """A rule and a network in one file: the lines each spans tell them apart."""
    config, model = registered
    objective = FailsLater(at=1)
    own = owncode.of_run(config, objective, model)
    assert {piece.what for piece in own} == {"rule 'later'", "network 'doubling'"}
    layer = next(m for m in model.modules() if isinstance(m, Doubling))
    layer.at = 1
    error = _raised(lambda: model(torch.rand(2, 1, 4, 4)))
    said = owncode.failure(own, error, "in epoch 3")
    assert said.startswith("network 'doubling' failed in epoch 3: ValueError: a doubling too ")
    assert said.endswith(f"own_rules.py:{Doubling.forward.__code__.co_firstlineno + 4})")
    error = _raised(lambda: objective(torch.rand(2, 3), torch.tensor([0, 1])))
    assert owncode.failure(own, error, "in epoch 3").startswith(
        "rule 'later' failed in epoch 3: ZeroDivisionError: division by zero ("
    )


class _Around(nn.Module):
    """A module of one's own whose forward calls a converted layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _around_net(net, num_classes, dropout):
    net.flatten()
    net.add(_Around(nn.Linear(16, num_classes, bias=False)))


def _flat_read(layer):
    return layer.weight.detach().flatten()


def test_a_b_that_a_pathways_read_returned_and_the_library_refused_is_the_pathways(monkeypatch):
    """The read returned, so the innermost frame of one's own code was the network's forward
    that called the layer: the refusal was blamed on the network (review)."""
    from brainprop import convert

    monkeypatch.setitem(ARCHITECTURES, "around", (_around_net, 0))
    monkeypatch.setitem(PATHWAYS, "flat", Pathway(lambda *_: None, _flat_read))
    model = build_model("around", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    convert(model, "flat")
    config = TrainConfig(arch="around", feedback="flat")
    own = owncode.of_run(config, BrainProp(0.02), model)
    assert {piece.what for piece in own} == {"network 'around'", "feedback 'flat'"}
    error = _raised(lambda: model(torch.rand(2, 1, 4, 4)))
    assert owncode.failure(own, error, "in epoch 2") == (
        "feedback 'flat' failed in epoch 2: read B [48] on cpu for a Linear layer whose weight "
        f"is [3, 16] on cpu: its read must return a B shaped like W, on its device "
        f"({definition(_flat_read)})"
    )


def _failing_read(layer):
    raise RuntimeError("a bug of one's own")


def test_a_pathways_read_that_raises_inside_ones_own_network_is_the_pathways(monkeypatch):
    """Of the two frames of one's own code, the network's forward and the read it reached,
    the innermost is the one that failed."""
    from brainprop import convert

    monkeypatch.setitem(ARCHITECTURES, "around", (_around_net, 0))
    monkeypatch.setitem(PATHWAYS, "failing", Pathway(lambda *_: None, _failing_read))
    model = build_model("around", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    convert(model, "failing")
    own = owncode.of_run(TrainConfig(arch="around", feedback="failing"), BrainProp(0.02), model)
    error = _raised(lambda: model(torch.rand(2, 1, 4, 4)))
    line = _failing_read.__code__.co_firstlineno + 1
    assert owncode.failure(own, error, "in epoch 2") == (
        "feedback 'failing' failed in epoch 2: RuntimeError: a bug of one's own "
        f"({__file__}:{line})"
    )


def test_the_librarys_code_under_a_name_of_ones_own_is_the_librarys(monkeypatch):
    """Its errors are bugs to report, with their traceback."""
    monkeypatch.setitem(OBJECTIVES, "greedy", lambda epsilon, fused: BrainProp(0.0))
    monkeypatch.setitem(PATHWAYS, "sign-too", Pathway(lambda *_: None, PATHWAYS["sign"].read))
    dense, sites = ARCHITECTURES["dense"]
    monkeypatch.setitem(ARCHITECTURES, "dense-too", (functools.partial(dense), sites))
    config = TrainConfig(rule="greedy", feedback="sign-too", arch="dense-too")
    model = build_model("dense-too", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    assert owncode.of_run(config, BrainProp(0.0), model) == []


def test_the_machines_limits_and_a_closed_output_are_never_the_users_code(registered):
    """Even raised in it (a print to a closed pipe, an allocation, a synchronised BatchNorm's
    collective that lost the other processes): their callers word them."""
    config, model = registered
    own = owncode.of_run(config, FailsLater(at=1), model)
    layer = next(m for m in model.modules() if isinstance(m, Doubling))
    limits = (
        MemoryError(),
        BrokenPipeError(),
        RuntimeError("[enforce fail] can't allocate memory"),
        LostOthers("process 0 of 2 lost the others during the BatchNorm statistics (...)"),
    )
    for error in (*limits, RuntimeError("a bug of one's own")):
        layer.calls, layer.at, layer.error = 0, 1, error
        said = owncode.failure(own, _raised(lambda: model(torch.rand(2, 1, 4, 4))), "in epoch 1")
        assert (said is None) == (error in limits), said


def test_an_error_raised_while_handling_ones_own_is_that_one(registered):
    """As a CUDA graph's capture, ended by the user's error, can raise its own; not one that
    replaced it on purpose (``from None``)."""
    config, model = registered
    objective = FailsLater(at=1)
    own = owncode.of_run(config, objective, model)

    def capture():
        try:
            objective(torch.rand(2, 3), torch.tensor([0, 1]))
        finally:
            raise RuntimeError("capture ended badly")

    error = _raised(capture)
    assert str(error) == "capture ended badly"
    assert owncode.failure(own, error, "in epoch 1").startswith(
        "rule 'later' failed in epoch 1: ZeroDivisionError"
    )

    def replace():
        try:
            FailsLater(at=1)(torch.rand(2, 3), torch.tensor([0, 1]))
        except ZeroDivisionError:
            raise RuntimeError("said otherwise, on purpose") from None

    assert owncode.failure(own, _raised(replace), "in epoch 1") is None


def test_code_without_a_file_is_nobodys_to_name(monkeypatch):
    """Typed into the interpreter: its error keeps its traceback."""
    namespace = {}
    exec("def rule(q, y, generator=None):\n    return 1 / 0\n", namespace)
    rule = namespace["rule"]
    rule.sums_over_nominal_batch = False
    monkeypatch.setitem(OBJECTIVES, "typed", lambda epsilon, fused: rule)
    config = TrainConfig(rule="typed")
    model = build_model("dense", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    assert owncode.of_run(config, rule, model) == []


def test_a_method_inherited_from_ones_own_base_class_is_ones_own(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "inheriting", (inheriting_net, 0))
    model = build_model("inheriting", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    own = owncode.of_run(TrainConfig(arch="inheriting"), BrainProp(), model)
    layer = next(m for m in model.modules() if isinstance(m, DoublingByItsBase))
    layer.at = 1
    error = _raised(lambda: model(torch.rand(2, 1, 4, 4)))
    assert owncode.failure(own, error, "in epoch 2").startswith(
        "network 'inheriting' failed in epoch 2: ValueError: a doubling too many ("
    )


@pytest.mark.parametrize(
    "rule", [fails_decorated, KeepsAFunction(at=1)], ids=["decorated", "holds-a-function"]
)
def test_a_decorated_rule_and_one_that_holds_a_function_are_ones_own(monkeypatch, rule):
    monkeypatch.setitem(OBJECTIVES, "mine", lambda epsilon, fused: rule)
    model = build_model("dense", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    own = owncode.of_run(TrainConfig(rule="mine"), rule, model)
    error = _raised(lambda: rule(torch.rand(2, 3), torch.tensor([0, 1])))
    assert owncode.failure(own, error, "in epoch 2").startswith(
        "rule 'mine' failed in epoch 2: ZeroDivisionError: division by zero ("
    )


def _line(module, text: str) -> int:
    """The line of ``module``'s file that holds ``text``."""
    source = Path(module.__file__).read_text().splitlines()
    return next(n for n, line in enumerate(source, 1) if text in line)


def test_a_wrapper_of_ones_own_around_the_librarys_code_names_its_own_line(monkeypatch):
    """Unwrapped as far as the library's function it wraps, the error named the library's line
    that called it."""
    monkeypatch.setitem(ARCHITECTURES, "wrapped", (wrapped_dense, 0))
    line = _line(own_rules, "bogus=1")
    with pytest.raises(BrainPropError, match=rf"TypeError: .+ \(.+own_rules\.py:{line}\)$"):
        build_model("wrapped", (1, 4, 4), 3)


def test_ones_own_decorator_from_another_file_and_what_it_decorates_are_both_ones_own(
    monkeypatch,
):
    """Unwrapped only as far as one's own decorator, the error named its line that called the
    function, not the line of the function that raised."""
    monkeypatch.setitem(ARCHITECTURES, "counted", (counted_net, 0))
    line = _line(own_rules, "unasked=1")
    with pytest.raises(BrainPropError, match=rf"TypeError: .+ \(.+own_rules\.py:{line}\)$"):
        build_model("counted", (1, 4, 4), 3)
    assert definition(counted_net).endswith(f"own_rules.py:{_line(own_rules, '@counted')}")
    own = owncode.of_run(TrainConfig(arch="counted"), BrainProp(), nn.Sequential())
    assert {piece.path.name for piece in own} == {"own_rules.py", "own_decorators.py"}
    counted_net.fail_at = counted_net.calls + 1
    error = _raised(lambda: counted_net(None, 3, ()))
    assert owncode.failure(own, error, "in epoch 1") == (
        "network 'counted' failed in epoch 1: RuntimeError: counted too many "
        f"({own_decorators.__file__}:{_line(own_decorators, 'raise RuntimeError')})"
    )


def test_a_rules_bases_from_the_standard_library_are_not_ones_own(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "typed", lambda epsilon, fused: TypedRule(at=1))
    model = build_model("dense", (1, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    own = owncode.of_run(TrainConfig(rule="typed"), TypedRule(at=1), model)
    assert {piece.path.name for piece in own} == {"own_rules.py"} and len(own) == 3


def test_packages_installed_beside_the_standard_library_are_ones_own():
    """Some systems install packages under /usr/lib/python3.X/site-packages: a plugin there
    is one's own, whose line an error must name, not the library's."""
    stdlib = errors._STDLIB
    assert errors.in_library(stdlib / "functools.py")
    assert not errors.in_library(stdlib / "site-packages" / "lab" / "rules.py")
    assert not errors.in_library(stdlib / "dist-packages" / "lab.py")


#: A rule and a pathway of one's own, in a plugin's file, with a helper neither calls; a page
#: break (a form feed, which Python does not count as a line break) above them.
LAB = """
from brainprop import Pathway
from own_rules import SquaredError
\x0c


def helper():
    return 1


class Base(SquaredError):
    sums_over_nominal_batch = False


class Mine(Base):
    def __call__(self, q, y, generator=None):
        return super().__call__(q, y, generator)


class Fused(Mine):
    fused = True


def signs(layer):
    return layer.weight.detach().sign()


RULE = lambda epsilon, fused: Fused() if fused else Mine()  # noqa: E731
PATHWAY = Pathway(make=lambda layer, std, generator: None, read=signs)
"""


def _digests(monkeypatch, folder, name, source):
    """:func:`owncode.digests` of LAB's rule and pathway, from ``source`` as the file
    ``folder/name.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    lab = importlib.util.module_from_spec(spec)
    # As a --plugin file is: a class's file is found through its module.
    monkeypatch.setitem(sys.modules, name, lab)
    spec.loader.exec_module(lab)
    monkeypatch.setitem(OBJECTIVES, "mine", lab.RULE)
    monkeypatch.setitem(PATHWAYS, "mine", lab.PATHWAY)
    return owncode.digests("mine", "mine")


def test_ones_own_code_is_known_by_its_lines_wherever_its_file_lies(tmp_path, monkeypatch):
    """Measurements merged in from another machine, where the file lies elsewhere, compare."""
    first = _digests(monkeypatch, tmp_path / "here", "lab_here", LAB)
    assert list(first) == ["rule 'mine'", "feedback 'mine'"]
    assert _digests(monkeypatch, tmp_path / "there", "lab_there", LAB) == first
    # Lines beside its code (another rule added to the file) leave it as it was.
    helper = _digests(monkeypatch, tmp_path, "lab_helper", LAB.replace("return 1", "return 2"))
    assert helper == first
    rule = _digests(monkeypatch, tmp_path, "lab_rule", LAB.replace("q, y, generator)", "q, y)"))
    assert rule["rule 'mine'"] != first["rule 'mine'"]
    assert rule["feedback 'mine'"] == first["feedback 'mine'"]
    read = _digests(monkeypatch, tmp_path, "lab_read", LAB.replace(".sign()", ".sign() * 1"))
    assert read["feedback 'mine'"] != first["feedback 'mine'"]
    # A def line is code too: a default argument changed there changes what runs.
    default = _digests(monkeypatch, tmp_path, "lab_default", LAB.replace("=None)", "=0)"))
    assert default["rule 'mine'"] != first["rule 'mine'"]
    signature = LAB.replace("signs(layer):", "signs(layer, scale=2):")
    read_def = _digests(monkeypatch, tmp_path, "lab_read_def", signature)
    assert read_def["feedback 'mine'"] != first["feedback 'mine'"]
    # What the fast path makes (fused), beside what --eager makes.
    fused = _digests(monkeypatch, tmp_path, "lab_fused", LAB.replace("= True", "= 1"))
    assert fused["rule 'mine'"] != first["rule 'mine'"]
    # A base class of one's own is the rule's code too.
    base = _digests(monkeypatch, tmp_path, "lab_base", LAB.replace("= False", "= bool(0)"))
    assert base["rule 'mine'"] != first["rule 'mine'"]
    assert owncode.digests("brainprop", "sign") == owncode.digests("ebp", "symmetric") == {}
