"""Training and evaluation of draft models (distillation, feature draft); never imported by the serving packages."""
