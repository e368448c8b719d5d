"""The ``addcow`` command line: one module per command family, thin over the library."""
