"""The NBD server: ``addcow serve``."""
