"""Real HST cluster fields (CLASH): field I/O, detection, cuts, stamps, shear maps, error analysis."""
