"""Integrators in depth, beside the field: `Discrete` (the standard Transformer), `PostLN`,
`Continuous` (diffrax) and `ExponentialContinuous` (the diffusion integrated exactly).

Every integrator works from the field's smooth pieces (`Field.pieces`) and returns a
`DepthSolution` with the final state and honest statistics.
"""

from ._base import AbstractDepth as AbstractDepth
from ._base import DepthSolution as DepthSolution
from ._base import DepthStats as DepthStats
from .continuous import DEFAULT_CHECKPOINTS as DEFAULT_CHECKPOINTS
from .continuous import AbstractContinuous as AbstractContinuous
from .continuous import Continuous as Continuous
from .continuous import default_adjoint as default_adjoint
from .continuous import default_controller as default_controller
from .continuous import evaluations_per_step as evaluations_per_step
from .discrete import Discrete as Discrete
from .discrete import PostLN as PostLN
from .exponential import ExponentialContinuous as ExponentialContinuous
