"""Datasets and the LightningDataModule that render stamps on the fly."""

from wlshear.data.datamodule import GroupedShearDataModule, ShearDataModule  # noqa: F401
from wlshear.data.datasets import CachedStampSet, GroupedShearStream, ShearStream  # noqa: F401
