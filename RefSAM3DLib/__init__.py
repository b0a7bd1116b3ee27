"""RefSAM3D: text-prompted 3D segmentation of CT and MRI.

Not a medical device; not for clinical use.
"""

__version__ = "0.1.0"
