"""Private Numba kernels of the simulator: arrays and scalars in, results written into ``out``
buffers. The public API (``kuramoto.py``, ``simulate.py``) validates, allocates and dispatches.

Shape legend: B systems, N oscillators, T recorded ticks (``_BT`` records) or tokens per tick
(``_T`` scratch), L layers, E experts, D domains, K top-k slots, X events.

Modules, by concern:
  jit          the ``kernel`` decorator (on-disk cache keyed on every kernel source)
  libm         counter RNG, sin/cos, exp, log and Gumbel noise (bit-equal where it matters)
  kuramoto     the mean-field Kuramoto integrator
  controller   ``law.step`` and ``law.routing_fields``; the parameter record of ControllerConfig
  environment  ``env.route`` (the v2 routing rule) and ``env.learn``
  driver       one driver body, compiled parallel (``simulate_batch``) and serial

Compiled lazily on first call (importing this package imports numba), cached on disk.
"""

from .controller import (HOST_ONLY_FIELDS, CtrlParams, controller_step, ctrl_params,
                         routing_fields_into)
from .driver import AdaptParams, BatchState, Events, Records, simulate_batch, simulate_serial
from .environment import EnvParams, env_learn, env_params, env_route, route_scratch
from .kuramoto import kuramoto_batch
from .libm import (exp_nonpos_into, gumbel_into, hash_into, log_into, normal_into, sincos_into,
                   uniform_into)

__all__ = ["CtrlParams", "ctrl_params", "HOST_ONLY_FIELDS", "controller_step",
           "routing_fields_into", "AdaptParams", "BatchState", "Events", "Records",
           "simulate_batch", "simulate_serial", "EnvParams", "env_params", "env_route",
           "env_learn", "route_scratch", "kuramoto_batch", "exp_nonpos_into", "gumbel_into",
           "hash_into", "log_into", "normal_into", "sincos_into", "uniform_into"]
