"""Datasets and the LightningDataModule that render stamps on the fly."""

from wlshear.data.datamodule import ShearDataModule  # noqa: F401
from wlshear.data.datasets import CachedStampSet, ShearStream  # noqa: F401
