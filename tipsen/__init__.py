"""tipsen: text-to-image for Korean seniors."""
__version__ = "0.1.0"
