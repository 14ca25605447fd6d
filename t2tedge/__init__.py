"""t2tedge: compile T2T-ViT and MobileNet baselines for edge targets and compare them honestly."""

__version__ = "0.1.0"
