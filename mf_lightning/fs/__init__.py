"""The file-system layer: everything ``mf`` writes that must survive a crash, and the locks that keep processes apart.

``atomic`` files replaced whole (one temporary-file naming scheme, fsync, leftovers of killed writers
removed) · ``folders`` folders built out of sight and swapped in whole · ``lock`` one holder per
lock file, with a heartbeat, taken over when the holder is gone · ``errors`` file-system failures
named by path · ``processes`` this host and whether a process of it still runs · ``remote`` paths
that are URLs (``s3://``...), which none of this applies to. docs/file-safety.md says what is promised.
This package imports nothing else of ``mf_lightning``, nor torch or Lightning.
"""
