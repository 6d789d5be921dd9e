"""The two-stage DreamBooth trainer with exact resume.

``fastsd.train.train(session, TrainSettings(...), resume=...)`` is what the notebook cell
and ``fastsd train`` call. Settings and presets: :mod:`fastsd.train.settings`; data order
and caches: :mod:`fastsd.train.data`; checkpoints: :mod:`fastsd.train.checkpoint`; the
model parts, what each stage trains and the loss: :mod:`fastsd.train.parts`; the position
and RNG states: :mod:`fastsd.train.state`; the optimizer: :mod:`fastsd.train.optim`; the
run's set-up: :mod:`fastsd.train.run`; the export: :mod:`fastsd.train.export`; the loop:
:mod:`fastsd.train.trainer`.
"""

from fastsd.train.settings import PRESETS, TrainSettings  # noqa: F401


def train(*args, **kwargs):
    """See :func:`fastsd.train.trainer.train` (imported on call: it needs torch)."""
    from fastsd.train.trainer import train as _train

    return _train(*args, **kwargs)
