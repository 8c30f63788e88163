"""`nestnas.data`: the user's data as (train, validation) datasets and loaders. A spec
(`digits`, a folder of class sub-folders, `FILE.npz`, `FILE.csv:label=COLUMN`,
`package.module:function`) or torch datasets/loaders become a `Data` with the per-sample shape,
the number of classes and a fingerprint; see `nestnas.supernet.data` for the grammar."""

from nestnas.supernet.data import (
                                   EXPECTED,
                                   KINDS,
                                   Data,
                                   DataSpec,
                                   data_for_checkpoint,
                                   digits_datasets,
                                   digits_loaders,
                                   load_data,
                                   parse_spec,
)

__all__ = ["EXPECTED", "KINDS", "Data", "DataSpec", "data_for_checkpoint", "digits_datasets", "digits_loaders",
           "load_data", "parse_spec"]
