"""The registries a user extends check an entry as it is made, and keep the library's own."""

import copy
from types import MappingProxyType

import numpy as np
import pytest

from brainprop import (
    ARCHITECTURES,
    DATASETS,
    EBP,
    OBJECTIVES,
    PATHWAYS,
    PRESETS,
    DatasetEntry,
    Hyperparameters,
    Pathway,
)
from brainprop.cli import main
from brainprop.errors import BrainPropError, UnknownName
from brainprop.feedback import check_feedback
from brainprop.presets import preset_hyperparameters, table_archs, table_row


def _build(net, num_classes, dropout):
    net.flatten()
    net.dense(num_classes, relu=False)


GOOD = {
    "OBJECTIVES": (OBJECTIVES, lambda epsilon, fused: EBP()),
    "ARCHITECTURES": (ARCHITECTURES, (_build, 0)),
    "PRESETS": (PRESETS, {("mnist", "dense"): Hyperparameters()}),
    "PATHWAYS": (PATHWAYS, Pathway(make=lambda layer, scale, g: None, read=lambda m: m.weight)),
    "DATASETS": (DATASETS, DatasetEntry(load=lambda root, test_only: None, family="mnist")),
}


@pytest.fixture(autouse=True)
def registries():
    kept = {label: set(registry) for label, (registry, _) in GOOD.items()}
    yield
    for label, (registry, _) in GOOD.items():
        for name in set(registry) - kept[label]:
            del registry[name]


@pytest.mark.parametrize(
    ("label", "entry", "message"),
    [
        ("OBJECTIVES", EBP, None),  # a class makes its objective: taken
        ("ARCHITECTURES", [_build, 1], "ARCHITECTURES['mine'] must be (builder, number of "
         "dropout sites), e.g. (build, 1), not a list"),
        ("ARCHITECTURES", (_build, np.int64(2)), None),
        ("PRESETS", MappingProxyType({("cifar100", "deep"): Hyperparameters()}), None),
        ("OBJECTIVES", "ebp",
         "OBJECTIVES['mine'] must be a function of (epsilon, fused) that makes the objective, "
         "not a str"),
        ("OBJECTIVES", 1,
         "OBJECTIVES['mine'] must be a function of (epsilon, fused) that makes the objective, "
         "not an int"),
        ("ARCHITECTURES", _build,
         "ARCHITECTURES['mine'] must be (builder, number of dropout sites), e.g. (build, 1), "
         "not a function"),
        ("ARCHITECTURES", (_build, 0, 1), "ARCHITECTURES['mine'] must be (builder, number of "
         "dropout sites), e.g. (build, 1), not a tuple of 3"),
        ("ARCHITECTURES", (_build, -1),
         "ARCHITECTURES['mine'] must end with its number of dropout sites, a whole number >= 0, "
         "not -1"),
        ("ARCHITECTURES", (_build, True), "ARCHITECTURES['mine'] must end with its number of "
         "dropout sites, a whole number >= 0, not True"),
        ("ARCHITECTURES", (_build, 1.0), "ARCHITECTURES['mine'] must end with its number of "
         "dropout sites, a whole number >= 0, not 1.0"),
        ("ARCHITECTURES", ("_build", 0),
         "ARCHITECTURES['mine'] must start with its builder, a function of (net, num_classes, "
         "dropout), not a str"),
        ("PRESETS", Hyperparameters(),
         "PRESETS['mine'] must be a table: {(dataset family, arch): Hyperparameters(...)}, not a "
         "Hyperparameters"),
        ("PRESETS", {"mnist/dense": Hyperparameters()},
         "PRESETS['mine'] has the key 'mnist/dense': a key is a (dataset family, arch) pair"),
        ("PRESETS", {("fashion-mnist", "dense"): Hyperparameters()},
         "PRESETS['mine'] has the key ('fashion-mnist', 'dense'): 'fashion-mnist' is no dataset "
         "family: one of mnist, cifar10, cifar100, tiny-imagenet"),
        ("PRESETS", {("mnist", "dense"): {"lr": 0.1}},
         "PRESETS['mine'] has the row ('mnist', 'dense'): a dict, not a Hyperparameters(...)"),
        ("PATHWAYS", lambda layer, scale, g: None,
         "PATHWAYS['mine'] must be a brainprop.Pathway, not a function"),
        ("DATASETS", lambda root, test_only: None,
         "DATASETS['mine'] must be a brainprop.DatasetEntry(load, family), not a function"),
        ("DATASETS", DatasetEntry(load="data/mine", family="mnist"),
         "DATASETS['mine'] must load with a function of (root, test_only=...) that returns the "
         "Dataset, not a str"),
        ("DATASETS", DatasetEntry(load=lambda root: None, family="mnist"),
         "DATASETS['mine'] must load with a function of (root, test_only=...) that returns the "
         "Dataset, not <lambda>(root)"),
        ("DATASETS", DatasetEntry(load=lambda *args, **kwargs: None, family="mnist"), None),
        ("DATASETS", DatasetEntry(load=lambda root, test_only: None, family="fashion-mnist"),
         "DATASETS['mine'] has the family 'fashion-mnist': one of mnist, cifar10, cifar100, "
         "tiny-imagenet, whose preset rows it takes"),
    ],
)  # fmt: skip
def test_an_entry_is_checked_as_it_is_made_by_any_route(label, entry, message):
    registry = GOOD[label][0]
    for route in (
        lambda: registry.__setitem__("mine", entry),
        lambda: registry.update(mine=entry),
        lambda: registry.setdefault("mine", entry),
    ):
        if message is None:
            route()
            assert registry["mine"] is entry
            del registry["mine"]
            continue
        with pytest.raises(BrainPropError) as refused:
            route()
        assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
        assert "mine" not in registry


@pytest.mark.parametrize("label", list(GOOD))
def test_the_librarys_own_entries_stay_as_they_are(label):
    registry, good = GOOD[label]
    name = next(iter(registry))
    kept = registry[name]
    for change in (
        lambda: registry.__setitem__(name, good),
        lambda: registry.__delitem__(name),
        lambda: registry.pop(name),
    ):
        with pytest.raises(BrainPropError, match=rf"^{label}\['{name}'\] is the library's own "):
            change()
        assert registry[name] is kept
    registry["mine"] = good  # one's own come and go
    registry["mine"] = good
    del registry["mine"]
    registry["mine"] = good
    registry.clear()  # one's own go, the library's stay
    assert list(registry) == list(registry.builtin) and registry[name] is kept


@pytest.mark.parametrize("label", list(GOOD))
def test_popitem_takes_ones_own_last_entry_and_leaves_the_librarys(label):
    registry, good = GOOD[label]
    registry["mine"] = good
    registry["mine2"] = good
    assert registry.popitem() == ("mine2", good) and registry.popitem() == ("mine", good)
    with pytest.raises(KeyError, match="holds no entry of one's own to pop"):
        registry.popitem()
    assert list(registry) == list(registry.builtin)


@pytest.mark.parametrize("name", [3, ["conv"], None])
def test_a_name_that_is_no_text_is_unknown_in_one_line(name):
    said = r"^architecture names are text, not .+: choose one of dense, "
    with pytest.raises(UnknownName, match=said):
        ARCHITECTURES.require(name)


def test_a_copy_of_a_registry_is_its_own():
    copied = copy.copy(ARCHITECTURES)
    copied["mine"] = (_build, 0)
    assert "mine" in copied and "mine" not in ARCHITECTURES
    with pytest.raises(BrainPropError, match="is the library's own"):
        del copied["conv"]


@pytest.mark.parametrize("name", ["", "a/b", "a,b", "two words", "-tiny", ".", "..", "+x", 3])
def test_a_name_that_could_not_name_a_run_or_be_an_option_value_is_refused(name):
    with pytest.raises(BrainPropError, match="a name starts with a letter, digit or _, then"):
        ARCHITECTURES[name] = (_build, 0)
    ARCHITECTURES["_1.x+y-z"] = (_build, 0)


@pytest.mark.parametrize(
    ("name", "part"), [("fb-random", "fb"), ("mine-bf16", "bf16"), ("x-val5000", "val5000"),
                       ("x-e2", "e2"), ("x-E2", "E2")],
)  # fmt: skip
def test_a_preset_named_with_a_mark_of_a_runs_name_is_refused(name, part):
    """Runs of preset 'fb-random' would be named as the paper's runs through random feedback:
    one of the two would be skipped as measured."""
    with pytest.raises(BrainPropError, match=rf"^PRESETS\['{name}'\]: its part '{part}' reads "):
        PRESETS[name] = GOOD["PRESETS"][1]
    PRESETS["e-val"] = GOOD["PRESETS"][1]  # marks only as whole parts


@pytest.mark.parametrize(("name", "part"), [("x-s1", "s1"), ("s0-x", "s0"), ("x-S1", "S1")])
def test_a_rule_named_with_a_seed_of_a_runs_name_is_refused(name, part):
    """Seed 0 of rule 'x-s1' would be named as seed 1 of rule 'x' under a preset 's0'."""
    with pytest.raises(
        BrainPropError,
        match=rf"^OBJECTIVES\['{name}'\]: its part '{part}' reads as the seed of a run's name",
    ):
        OBJECTIVES[name] = GOOD["OBJECTIVES"][1]
    OBJECTIVES["s-x1"] = GOOD["OBJECTIVES"][1]  # a seed only as a whole part


@pytest.mark.parametrize("label", ["OBJECTIVES", "PRESETS"])
def test_a_name_differing_from_anothers_only_in_case_is_refused(label):
    """On a disk that ignores case (macOS, Windows) their runs would share folders and files."""
    registry, entry = GOOD[label]
    registry["mine"] = entry
    for name in ("EBP" if label == "OBJECTIVES" else "Paper", "Mine"):
        message = rf"\['{name}'\]: it differs from '{name.lower()}' only in case"
        with pytest.raises(BrainPropError, match=message):
            registry[name] = entry
    registry["mine"] = entry  # its own name: replaced
    registry["ss"] = entry
    with pytest.raises(BrainPropError, match=r"\['ß'\]: it differs from 'ss' only in case"):
        registry["ß"] = entry


def test_the_modes_that_are_no_pathway_are_no_names_for_one():
    with pytest.raises(BrainPropError, match="it differs from 'direct' only in case"):
        PATHWAYS["Direct"] = GOOD["PATHWAYS"][1]
    for name in ("symmetric", "direct"):
        with pytest.raises(BrainPropError, match="is a built-in mode that is no pathway through"):
            PATHWAYS[name] = GOOD["PATHWAYS"][1]


def test_a_table_of_ones_own_changed_after_it_was_registered_is_checked_when_read():
    table = {("mnist", "dense"): Hyperparameters(lr=0.05)}
    PRESETS["mine"] = table
    assert preset_hyperparameters("mnist", "dense", "mine").lr == 0.05
    table[("mnist", "conv")] = {"lr": 0.05}
    for read in (
        lambda: preset_hyperparameters("mnist", "dense", "mine"),
        lambda: table_row("mine", "mnist", "dense"),  # reproduce, the report, bench
        lambda: table_archs("mine", "mnist"),
    ):
        with pytest.raises(BrainPropError, match=r"^PRESETS\['mine'\] has the row \('mnist', 'co"):
            read()


def test_a_plugin_that_registers_a_wrong_entry_is_named_with_its_line(tmp_path, capsys):
    plugin = tmp_path / "lab_wrong.py"
    plugin.write_text(
        "from brainprop import ARCHITECTURES\n\n"
        "def tiny(net, num_classes, dropout):\n"
        "    net.flatten()\n\n"
        "ARCHITECTURES['tiny'] = tiny\n"
    )
    assert main(["--plugin", str(plugin), "datasets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--plugin {plugin} failed as it was imported: ARCHITECTURES['tiny'] must be (" in err
    assert err.rstrip().endswith(f"({plugin}:6)")


@pytest.mark.parametrize(
    ("registry", "name", "meant"),
    [(OBJECTIVES, "brainprp", "brainprop"), (OBJECTIVES, "BrainProp", "brainprop"),
     (ARCHITECTURES, "dens", "dense"), (DATASETS, "cifar-10", "cifar10"),
     (PRESETS, "tuned1.25", "tuned-lr1.25"), (None, "Symmetric", "symmetric"),
     (OBJECTIVES, "bp", None),
     (DATASETS, "mnist-small", None), (DATASETS, "imagenet", None)],
)  # fmt: skip
def test_an_unknown_name_close_to_a_registered_one_asks_whether_that_was_meant(
    registry, name, meant
):
    """A typo, not a registration this process lacks; a name not that close (a dataset of
    one's own whose plugin is missing, say) is told about plugins."""
    # Feedback modes are checked apart: symmetric and direct are no pathways of PATHWAYS.
    with pytest.raises(UnknownName) as unknown:
        check_feedback(name) if registry is None else registry.require(name)
    said = str(unknown.value)
    if meant is None:
        assert "did you mean" not in said and "brainprop --plugin MODULE" in said
    else:
        assert said.endswith(f"; did you mean {meant!r}?") and "plugin" not in said


def test_the_command_asks_whether_a_close_registered_name_was_meant(capsys):
    """argparse's own "invalid choice", for the options whose choices plugins add to."""
    for argv in (["train", "--rule", "brainprp"], ["train", "--arch", "transformer"]):
        with pytest.raises(SystemExit, match="2"):
            main(argv)
    first, second = capsys.readouterr().err.splitlines()
    assert "invalid choice: 'brainprp'" in first and "; did you mean 'brainprop'? (see " in first
    assert "invalid choice: 'transformer'" in second and "did you mean" not in second
