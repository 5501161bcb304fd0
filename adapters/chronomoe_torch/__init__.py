"""chronomoe_torch: the P×T controller in PyTorch MoE training."""
