"""genart_utils: the helpers that the notebooks of "Generative AI for Art" import.

One module per concern: :mod:`~genart_utils.runtime` (device, seeds, profiles, config
validation), :mod:`~genart_utils.data` (datasets), :mod:`~genart_utils.training` (the one
loop, callbacks, checkpoints), :mod:`~genart_utils.distributions` (divergences and mixtures
for the foundations chapter), the model families :mod:`~genart_utils.gan`,
:mod:`~genart_utils.vae` and :mod:`~genart_utils.gpt`, :mod:`~genart_utils.sampling`
(decoding), :mod:`~genart_utils.text` (corpora, n-gram models), :mod:`~genart_utils.music`
(folk tunes in ABC notation), :mod:`~genart_utils.metrics` (evaluation),
:mod:`~genart_utils.plotting` (figures) and :mod:`~genart_utils.widgets` (interactive
explorers).

``__version__`` is the one place that names the version: pyproject.toml reads it, and each
notebook's Colab install cell pins the release tag ``v<__version__>``
(tests/test_release.py checks both).
"""

__version__ = "0.2.0"
