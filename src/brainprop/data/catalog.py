"""The library's own datasets, one row each: the format its files are read in, the preset rows
it takes, its sizes, and where ``brainprop download`` fetches its official files. Adding a
dataset in a format the library reads, of a family the preset tables have rows for, is one row
here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .cifar import CifarPickles
from .dataset import Dataset
from .idx import IDX_FILE_NAMES, IdxFiles
from .status import DatasetStatus
from .tinyimagenet import TinyImageNetTree

#: The dataset families, the first item of a preset table's key: each dataset takes its
#: family's rows of hyperparameters.
FAMILIES = ("mnist", "cifar10", "cifar100", "tiny-imagenet")


class Format(Protocol):
    """How the files of a dataset in one official format are found, checked and read.

    Each method takes the dataset's name and the data root. ``image`` is ``(C, H, W)`` and
    ``classes`` the label count of the official files; ``verified_by_loading``: a download
    loads the files already there, reading them whole, before it calls them ready.
    """

    @property
    def image(self) -> tuple[int, int, int]: ...
    @property
    def classes(self) -> int: ...
    @property
    def verified_by_loading(self) -> bool: ...

    def dataset_dir(self, name: str, root: Path) -> Path:
        """The folder the loader reads."""
        ...

    def inside_hint(self, name: str, root: Path) -> str | None:
        """The fix where ``root`` is a folder inside the data root that holds the files."""
        ...

    def how_to_get(self, name: str, root: Path) -> str:
        """One line on obtaining the files."""
        ...

    def status(self, name: str, root: Path) -> DatasetStatus:
        """A quick look at the files, without reading them whole: there, and not damaged as
        far as that tells."""
        ...

    def load(self, name: str, root: Path, *, test_only: bool = False) -> Dataset:
        """The dataset; an error is one ``BrainPropError`` with its fix."""
        ...


@dataclass(frozen=True)
class Remote:
    """One official file: its name on the server, md5, and size in bytes (within a few
    percent: a server that sends more than twice that is sending something else, and is cut
    off before it fills the disk, since the md5 can only be checked at the end)."""

    name: str
    md5: str
    size: int


@dataclass(frozen=True)
class Source:
    """Where a dataset's official files come from and where they go under the data root: where
    its format reads them (a test checks each row), ``root/<name>`` for the formats that take
    the folder from the dataset's name (IDX files, Tiny ImageNet)."""

    base_url: str
    files: tuple[Remote, ...]  # each fetched as base_url + name
    folder: str  # destination under the data root
    top: str | None  # the folder an archive must unpack to; None: keep the files as they are
    #: A file at the top of the unpacked tree, which tells a tree unpacked one folder too deep.
    marker: str | None = None


@dataclass(frozen=True)
class Official:
    """One of the library's datasets.

    Attributes:
        format: how its files are found, checked and read.
        family: the one of :data:`FAMILIES` whose preset rows it takes.
        n_train, n_test: the official splits' sizes (Tiny ImageNet's test split is its
            labelled ``val`` split), which ``bench`` copies in random images.
        source: where ``brainprop download`` fetches it from.
    """

    format: Format
    family: str
    n_train: int
    n_test: int
    source: Source


def _idx_files(*md5_size: tuple[str, int]) -> tuple[Remote, ...]:
    """The four IDX files, gzipped as published, in :data:`~.idx.IDX_FILE_NAMES` order."""
    return tuple(
        Remote(f"{name}.gz", md5, size)
        for name, (md5, size) in zip(IDX_FILE_NAMES, md5_size, strict=True)
    )


_CIFAR10 = Source(
    "https://www.cs.toronto.edu/~kriz/",
    (Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170_498_071),),
    folder="cifar10",
    top="cifar-10-batches-py",
    marker="batches.meta",
)
_CIFAR100 = Source(
    "https://www.cs.toronto.edu/~kriz/",
    (Remote("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437),),
    folder="cifar100",
    top="cifar-100-python",
    marker="meta",
)


def _cifar100(label_key: bytes, classes: int) -> CifarPickles:
    """CIFAR-100's pickles, one archive for both label sets (``brainprop download cifar100``
    fetches it), read for one of them."""
    return CifarPickles(
        _CIFAR100.folder, _pickles_in(_CIFAR100), ("train",), ("test",), label_key, classes,
        download_name="cifar100",
    )  # fmt: skip


def _pickles_in(source: Source) -> str:
    """The folder the pickles are in: the one the source's archive unpacks to."""
    assert source.top is not None, "a CIFAR archive unpacks to a folder"
    return source.top


#: The library's datasets by name. Fashion-MNIST has MNIST's format and was not in the paper,
#: so it takes MNIST's settings; CIFAR-100's coarse labels take CIFAR-100's.
CATALOG: dict[str, Official] = {
    "mnist": Official(
        format=IdxFiles("MNIST"),
        family="mnist",
        n_train=60_000,
        n_test=10_000,
        source=Source(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            _idx_files(
                ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 9_912_422),
                ("d53e105ee54ea40749a09fcbcd1e9432", 28_881),
                ("9fb629c4189551a2d022fa330f9573f3", 1_648_877),
                ("ec29112dd5afa0611ce80d1b7f02629c", 4_542),
            ),
            folder="mnist",
            top=None,
        ),
    ),
    "fashion-mnist": Official(
        format=IdxFiles(
            "Fashion-MNIST",
            system_dir=Path("/usr/share/datasets/fashion-mnist"),
            system_package="dataset-fashion-mnist",
        ),
        family="mnist",
        n_train=60_000,
        n_test=10_000,
        source=Source(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            _idx_files(
                ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26_421_880),
                ("25c81989df183df01b3e8a0aad5dffbe", 29_515),
                ("bef4ecab320f06d8554ea6380940ec79", 4_422_102),
                ("bb300cfdad3c16e7a12a480ee83cd310", 5_148),
            ),
            folder="fashion-mnist",
            top=None,
        ),
    ),
    "cifar10": Official(
        format=CifarPickles(
            folder=_CIFAR10.folder,
            subdir=_pickles_in(_CIFAR10),
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_files=("test_batch",),
            label_key=b"labels",
            classes=10,
            download_name="cifar10",
        ),
        family="cifar10",
        n_train=50_000,
        n_test=10_000,
        source=_CIFAR10,
    ),
    "cifar100": Official(
        format=_cifar100(b"fine_labels", 100),
        family="cifar100",
        n_train=50_000,
        n_test=10_000,
        source=_CIFAR100,
    ),
    "cifar100-coarse": Official(
        format=_cifar100(b"coarse_labels", 20),
        family="cifar100",
        n_train=50_000,
        n_test=10_000,
        source=_CIFAR100,
    ),
    "tiny-imagenet": Official(
        format=TinyImageNetTree(),
        family="tiny-imagenet",
        n_train=100_000,
        n_test=10_000,
        source=Source(
            "http://cs231n.stanford.edu/",
            (Remote("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", 248_100_043),),
            folder="tiny-imagenet",
            top="tiny-imagenet-200",
            marker="wnids.txt",
        ),
    ),
}
