"""File formats and safe IO, the bottom layer: the lab's HDF5 data (:mod:`.data`), atomic
writes that never clobber, content hashes and versions for provenance (:mod:`.files`)."""
