"""Registration networks, one file each."""

from vitreg.nets.vitvnet import VitVNet, VitVNetConfig

__all__ = ["VitVNet", "VitVNetConfig"]
