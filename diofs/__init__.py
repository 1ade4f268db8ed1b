"""diofs: a FUSE filesystem in one image file that gets Linux direct-I/O semantics right."""

__version__ = "0.1.0"
