"""Distillation: the loss terms (one module each), the teacher targets per mode and the teacher-logit cache."""
