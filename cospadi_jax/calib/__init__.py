"""Calibration statistics: Grams of projection inputs."""

from .grams import Grams, collect_grams, iter_layer_grams

__all__ = ["Grams", "collect_grams", "iter_layer_grams"]
