"""Built-in plugins: FIITED, DASNet and HyPar."""
