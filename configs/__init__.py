"""Experiment configs: ``configs/<name>.py`` files whose ``get_config()`` returns a ConfigDict.

Variants import :mod:`configs.default` and override a few fields. Use them with
``python train.py --config=configs/<name>.py --config.train.epochs=3``.
"""
