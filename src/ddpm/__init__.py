"""DDPM on CIFAR-10: the package behind the DVC pipeline's stages."""
