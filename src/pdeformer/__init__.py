"""pdeformer: Transformers as partial differential equations in depth.

One vector field (`Field`), many integrators: `Discrete()` is the standard Transformer,
`Continuous(solver, controller, adjoint)` its exact flow under diffrax.
"""

from .depth import AbstractContinuous as AbstractContinuous
from .depth import AbstractDepth as AbstractDepth
from .depth import Continuous as Continuous
from .depth import DepthSolution as DepthSolution
from .depth import DepthStats as DepthStats
from .depth import Discrete as Discrete
from .depth import ExponentialContinuous as ExponentialContinuous
from .depth import PostLN as PostLN
from .depth import evaluations_per_step as evaluations_per_step
from .exprk import AbstractExponentialRK as AbstractExponentialRK
from .exprk import ExpRK2 as ExpRK2
from .exprk import ExpRK3 as ExpRK3
from .field import AbstractComposition as AbstractComposition
from .field import AbstractLayerTerm as AbstractLayerTerm
from .field import AbstractSchedule as AbstractSchedule
from .field import Block as Block
from .field import Field as Field
from .field import Interpolated as Interpolated
from .field import ParallelBlock as ParallelBlock
from .field import PerLayer as PerLayer
from .field import PieceRate as PieceRate
from .field import Pieces as Pieces
from .field import Polynomial as Polynomial
from .field import SequentialBlock as SequentialBlock
from .field import Shared as Shared
from .models import AbstractPooling as AbstractPooling
from .models import AbstractPositions as AbstractPositions
from .models import Classifier as Classifier
from .models import ClsPooling as ClsPooling
from .models import DualClassifier as DualClassifier
from .models import Encoder as Encoder
from .models import LearnedPositions as LearnedPositions
from .models import MeanPooling as MeanPooling
from .models import SinusoidalPositions as SinusoidalPositions
from .operators import AbstractNorm as AbstractNorm
from .operators import AdaptiveDiffusionLayer as AdaptiveDiffusionLayer
from .operators import DiffusionLayer as DiffusionLayer
from .operators import DiffusionOperator as DiffusionOperator
from .operators import Dropout as Dropout
from .operators import Identity as Identity
from .operators import LayerNorm as LayerNorm
from .operators import MultiHeadAttention as MultiHeadAttention
from .operators import Reaction as Reaction
from .operators import RMSNorm as RMSNorm
from .operators import neumann_laplacian as neumann_laplacian
from .operators.spectral import DiffusionTerm as DiffusionTerm
from .operators.spectral import exact_diffusion as exact_diffusion
from .placement import INSERTION_POINTS as INSERTION_POINTS
from .regularisers import AbstractRegulariser as AbstractRegulariser
from .regularisers import ErrorEstimate as ErrorEstimate
from .regularisers import JacobianFrobenius as JacobianFrobenius
from .regularisers import KineticEnergy as KineticEnergy
from .regularisers import seminorm_backsolve as seminorm_backsolve
from .unrolled import Unrolled as Unrolled

__version__ = "0.1.0"

from . import diagnostics as diagnostics
from . import placement as placement
from . import regularisers as regularisers


def __getattr__(name: str):
    # `pdeformer.data` (the LRA readers and generators) and `pdeformer.training` (which reads
    # it) load on first use: `import pdeformer` brings in the library's concepts only.
    if name in ("data", "training"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
