"""vitreg: ViT-V-Net deformable registration of 3D brain MRI."""

from vitreg.errors import OptionError, VitregError

__version__ = "0.1.0"

__all__ = ["OptionError", "VitregError", "__version__"]
