"""Poses and uncertainties from a trained network (and from projection matching), calibration."""
