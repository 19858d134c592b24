"""Generated kernels (see nmgen). Never edited by hand: run `nmgen generate`."""
