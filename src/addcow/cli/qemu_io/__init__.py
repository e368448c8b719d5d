"""qemu-io for ``addcow io``: argument syntax, output format, session, commands."""
