"""metateach: learning to teach as one bilevel problem.

Importing the package fills the registries, so that every data set, noise
model, student, optimizer, schedule and teacher can be named in a config::

    import metateach

    cfg = metateach.load_config("configs/quickstart.yaml", ["train.epochs=5"])
    trainer = metateach.Trainer(cfg)
    metrics = trainer.fit()  # or metateach.train(cfg)
"""

import os
from collections.abc import Sequence

from metateach import data, hypergrad, models, optim, teachers  # noqa: F401 - registration
from metateach.config import ExperimentConfig, load_config
from metateach.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MetateachError,
    RunInterrupted,
)
from metateach.hypergrad.check import HypergradientCheck, check_hypergradient
from metateach.learning import (
    ExampleGradient,
    FixedRule,
    Hypergradient,
    PeerLearning,
    PolicyGradient,
)
from metateach.lesson import Lesson
from metateach.models import create_model
from metateach.registry import DATASETS, HYPERGRADS, MODELS, NOISES, OPTIMIZERS, SCHEDULES, TEACHERS
from metateach.student import Student, StudentStates
from metateach.teacher import StudentView, Teacher, TeachingContext

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DATASETS",
    "DataError",
    "ExampleGradient",
    "FixedRule",
    "HYPERGRADS",
    "Hypergradient",
    "HypergradientCheck",
    "Lesson",
    "ExperimentConfig",
    "MODELS",
    "MetateachError",
    "NOISES",
    "OPTIMIZERS",
    "PeerLearning",
    "PolicyGradient",
    "RunInterrupted",
    "SCHEDULES",
    "Student",
    "StudentStates",
    "StudentView",
    "TEACHERS",
    "Teacher",
    "TeachingContext",
    "Trainer",
    "check_hypergradient",
    "create_model",
    "load_config",
    "train",
]


def train(
    config: ExperimentConfig | str | os.PathLike[str], overrides: Sequence[str] = ()
) -> dict[str, float]:
    """Train one experiment to the end; its final metrics (`test/acc`, ...).

    `config` is a loaded `ExperimentConfig` or the path of a YAML experiment,
    read with `overrides` (`["train.epochs=5"]`) as `metateach train` reads
    its command line:

    ```python
    import metateach

    metrics = metateach.train("configs/quickstart.yaml", ["train.epochs=5"])
    print(metrics["test/acc"])
    ```

    SIGINT (Ctrl-C) or SIGTERM stops the run at its next step boundary with
    its state saved, and raises `RunInterrupted`; run it again to continue.
    A second signal acts at once.

    For the run folder, the student or the teacher afterwards, build a
    `Trainer` and call its `fit()`.
    """
    from metateach.runtime import stops_on_signals
    from metateach.trainer import Trainer

    if isinstance(config, ExperimentConfig):
        if overrides:
            raise TypeError("overrides apply to a YAML path; change a loaded config's fields")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    with stops_on_signals(trainer):
        return trainer.fit()


def __getattr__(name: str):
    # The trainer (and what it imports: W&B, the plots) loads when first asked
    # for, so that a plugin's `from metateach import Teacher` stays quick.
    if name == "Trainer":
        from metateach.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'metateach' has no attribute {name!r}")
