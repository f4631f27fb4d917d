"""The DDP trainer: `python -m train --config configs/resnet18.yaml` (or under torchrun)."""
