"""Attack tests of issue 9: each reproduces one way a hostile or careless client hurt the service."""
