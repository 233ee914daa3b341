"""Training and evaluation: one step function for every task and every integrator in depth.

The integrator (`Discrete()` or `Continuous(...)`) is an argument of `train_step` and
`evaluate`, a pytree whose tolerances are arrays, so changing a tolerance does not recompile.
`DataParallel` splits batches over several devices (and hosts) with `jax.sharding`.
"""

from ._parallel import DataParallel as DataParallel
from ._parallel import to_host as to_host
from ._train import CHECKPOINT_NAME as CHECKPOINT_NAME
from ._train import METRICS_NAME as METRICS_NAME
from ._train import SCHEDULES as SCHEDULES
from ._train import CorruptCheckpointError as CorruptCheckpointError
from ._train import Evaluation as Evaluation
from ._train import NonFiniteLossError as NonFiniteLossError
from ._train import Optimizer as Optimizer
from ._train import TrainConfig as TrainConfig
from ._train import decay_mask as decay_mask
from ._train import evaluate as evaluate
from ._train import has_dropout as has_dropout
from ._train import load_checkpoint as load_checkpoint
from ._train import make_optimizer as make_optimizer
from ._train import rsqrt_schedule as rsqrt_schedule
from ._train import save_checkpoint as save_checkpoint
from ._train import train as train
from ._train import train_step as train_step
from .gate import *  # noqa: F403 (the learning gate: the names in gate.__all__)

__all__ = [
    "CHECKPOINT_NAME",
    "CorruptCheckpointError",
    "DataParallel",
    "METRICS_NAME",
    "SCHEDULES",
    "Evaluation",
    "NonFiniteLossError",
    "Optimizer",
    "TrainConfig",
    "decay_mask",
    "evaluate",
    "has_dropout",
    "load_checkpoint",
    "make_optimizer",
    "rsqrt_schedule",
    "save_checkpoint",
    "to_host",
    "train",
    "train_step",
]
