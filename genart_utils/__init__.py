"""genart_utils: the helpers that the notebooks of "Generative AI for Art" import.

One module per concern: :mod:`~genart_utils.runtime` (device, seeds, profiles),
:mod:`~genart_utils.data` (datasets), :mod:`~genart_utils.training` (the one loop,
checkpoints), :mod:`~genart_utils.plotting` (figures), :mod:`~genart_utils.widgets`
(interactive explorers) and :mod:`~genart_utils.distributions` (divergences and
mixtures for the foundations chapter).
"""

__version__ = "0.1.0"
