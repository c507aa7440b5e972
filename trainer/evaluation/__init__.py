"""Evaluation: calibration metrics, temperature scaling and the corruption benchmark."""
