"""Operators of the field, each acting on one sequence `(seq, dim)`.

Attention, the reaction and the norms also take a batch on leading axes `(*batch, seq,
dim)`, which is faster on the CPU than `jax.vmap` over them (see `docs/architecture.md`);
the diffusion operators and layers act on one sequence, batched with `jax.vmap`.
"""

from .attention import MultiHeadAttention as MultiHeadAttention
from .diffusion import DiffusionOperator as DiffusionOperator
from .diffusion import neumann_laplacian as neumann_laplacian
from .diffusion_layer import AdaptiveDiffusionLayer as AdaptiveDiffusionLayer
from .diffusion_layer import DiffusionLayer as DiffusionLayer
from .dropout import Dropout as Dropout
from .normalization import AbstractNorm as AbstractNorm
from .normalization import Identity as Identity
from .normalization import LayerNorm as LayerNorm
from .normalization import RMSNorm as RMSNorm
from .reaction import Reaction as Reaction
