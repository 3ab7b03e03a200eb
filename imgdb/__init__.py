"""imgdb: image retrieval with pooled CNN descriptors kept in an HDF5 store."""

__version__ = "0.1.0"
