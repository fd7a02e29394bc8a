"""Document-length distributions (the shipped real ones under ``doclens/``) and packing of micro-batches."""
