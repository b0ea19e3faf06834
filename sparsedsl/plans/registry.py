"""Every plan the planner considers, one line each. Where no candidate has a measured cost,
the planner takes the first that can run, in this order."""

from __future__ import annotations

from .band import BandPlan
from .base import Plan
from .branches import BranchesPlan
from .decode import DecodePlan
from .flex import FlexPlan
from .gather import GatherPlan
from .lattice import LatticePlan
from .sdpa import SdpaPlan
from .tile_sdpa import TileSdpaPlan

PLANS: tuple[Plan, ...] = (
    SdpaPlan(),
    LatticePlan(),
    BandPlan(),
    DecodePlan(),
    BranchesPlan(),
    FlexPlan(),
    TileSdpaPlan(),
    GatherPlan(),
)

#: Plan names, for ``kernel=`` (``"auto"``: the planner chooses).
KERNELS = ("auto", *(plan.name for plan in PLANS))
