"""Model implementations that are not in diffusers (Open-Sora 1.2 STDiT3 and its video VAE)."""
